"""``visionzoo.Backbone``: one mmdet / mmseg backbone type over ``timm.create_model(features_only=True)``.

Hierarchical families (BiFormer, OverLoCK, PATNet) return their four stage outputs (strides 4 to 32).
Plain families (Vim, DependencyViT, Sparsifiner) return stride-16 block outputs; with the default
``pyramid="auto"`` they go through :class:`visionzoo.layers.SimpleFeaturePyramid` (four tapped blocks,
one per scale, as the official Vim segmentation backbone; fewer blocks: the last one shared by every
scale, as ViTDet), giving strides 4/8/16/32 too.

Family options the papers' dense variants need:

* ``out_norms``: the extra per-output norms of the official dense backbones (the families'
  ``feature_norms``: BiFormer, OverLoCK, PATNet). Default: on, as the families' ``features_only``
  default; plain families have none.
* OverLoCK's context-fused stride-32 output of the official detection backbone:
  ``model_kwargs=dict(h_proj=True)``.
* BiFormer: ``auto_pad=True`` by default here (the official dense backbones pad BRA inputs), and
  ``model_kwargs=dict(n_win=...)`` for the official 16 (COCO) / 8 (ADE20K) routing regions.
* Plain families are built with ``dynamic_img_size=True`` (any multiple of the patch size).

OpenMMLab conventions: ``out_indices``, ``frozen_stages`` (-1: none; 0: the stem; k: the stem and the
layers that compute feature level k-1, in the family's forward order), ``norm_eval`` (BatchNorm layers
stay in eval mode while training), ``with_cp`` (activation checkpointing, the model's
``set_grad_checkpointing``), ``init_cfg=dict(type="Pretrained", checkpoint=PATH, prefix=None)``
(tensors only; see :mod:`visionzoo.mm.checkpoint`). ``pretrained=True`` loads the model's official
timm weights at construction; a path string is taken as ``init_cfg`` (mmdet's older convention).

The model, its meta-device probe, the pyramid and the outputs come from
:class:`visionzoo.layers.DenseBackbone` (shared with ``visionzoo.tasks``); this module adds the
mmengine shell: registration, ``init_cfg``, ``frozen_stages``, ``norm_eval`` and ``with_cp``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from mmengine.model import BaseModule
from timm.models._manipulate import group_with_matcher
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.dense import DenseBackbone, probe_dense
from ..models import VISIONZOO_MODELS
from ._registry import MODELS
from .checkpoint import load_backbone_checkpoint

__all__ = ["VisionZooBackbone"]

# Defaults of the official dense backbones that the classification defaults lack.
_DENSE_DEFAULTS: dict[str, dict[str, Any]] = {"biformer": dict(auto_pad=True)}


def _config_error(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


@MODELS.register_module(name="Backbone")
class VisionZooBackbone(DenseBackbone, BaseModule):
    """Any visionzoo model (or timm model) as an OpenMMLab backbone.

    timm models that timm wraps with their ``forward_intermediates`` (``FeatureGetterNet``) get every
    option; other timm models (e.g. ResNets, wrapped as ``FeatureListNet``) only the basic ones (no
    ``frozen_stages``, ``with_cp``, layer decay, ``init_cfg``).

    Args:
        model_name: a registered visionzoo / timm model (``"biformer_small"``, ``"vim_small"``, ...).
        out_indices: feature levels to return (default: the model's dense default: the four stages, or
            the four blocks the official plain dense backbones tap, e.g. Vim's [5, 11, 17, 23]).
        pretrained: ``True`` loads the official timm weights now; a path is taken as ``init_cfg``.
        drop_path_rate: stochastic depth of the backbone.
        out_norms: the official dense output norms (the families' ``feature_norms``); ``None`` keeps
            the family's ``features_only`` default (on).
        pyramid: plain backbones only: ``"auto"``/``True`` adds the simple feature pyramid, ``False``
            returns the stride-16 maps as they are.
        pyramid_channels: ``None`` keeps the backbone width (Vim recipe); an int adds ViTDet's projection.
        frozen_stages, norm_eval, with_cp: OpenMMLab conventions (see the module docstring).
        model_kwargs: further ``timm.create_model`` arguments (``n_win``, ``h_proj``, ``img_size``, ...).
        init_cfg: ``None`` (the model's own init) or ``dict(type="Pretrained", checkpoint=..., prefix=...)``.
    Attributes:
        out_channels: channels per returned level (use them for the neck's ``in_channels``).
        strides: stride per returned level.
    Forward:
        (B, 3, H, W) -> tuple of (B, C_i, H / s_i, W / s_i).
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: bool | str = False,
        drop_path_rate: float | None = None,
        out_norms: bool | None = None,
        pyramid: str | bool = "auto",
        pyramid_channels: int | None = None,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        init_cfg: dict | list[dict] | None = None,
    ):
        where = f"visionzoo.Backbone({model_name!r})"
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            import visionzoo

            raise ValueError(f"visionzoo.Backbone: unknown model_name {model_name!r} "
                             f"(visionzoo models: {', '.join(visionzoo.list_models())})")
        if isinstance(pretrained, str):
            if init_cfg is not None:
                raise _config_error(where, "give the checkpoint either as pretrained=PATH or in init_cfg, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
            pretrained = False
        checkpoint_cfg = self._parse_init_cfg(where, init_cfg)
        meta = VISIONZOO_MODELS.get(model_name)
        family = meta.family if meta else None

        kwargs = dict(model_kwargs or {})
        for key in ("features_only", "out_indices", "pretrained"):
            if key in kwargs:
                raise _config_error(where, f"model_kwargs may not set {key!r}; it is an option of visionzoo.Backbone")
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = drop_path_rate
        for key, value in _DENSE_DEFAULTS.get(family, {}).items():
            kwargs.setdefault(key, value)
        probe = probe_dense(model_name, **kwargs)
        if out_norms and not probe.feature_norms:
            raise _config_error(where, f"out_norms=True, but {family or model_name} has no dense output norms "
                                       f"(its constructor takes no feature_norms)")
        n = len(probe.modules)
        if not -1 <= frozen_stages <= n:
            raise _config_error(where, f"frozen_stages={frozen_stages} out of range: {model_name} has {n} "
                                       f"feature levels (use -1..{n})")
        try:
            super().__init__(model_name, bool(pretrained), out_indices=out_indices, pyramid=pyramid,
                             pyramid_channels=pyramid_channels, feature_norms=out_norms, model_kwargs=kwargs,
                             init_cfg=init_cfg)
        except ValueError as e:  # the adapter's one-line configuration errors, named after this type
            raise _config_error(where, str(e)) from e
        self._checkpoint = checkpoint_cfg
        self.family = family

        needs = [opt for opt, used in (("frozen_stages", frozen_stages >= 0), ("with_cp", with_cp)) if used]
        if needs and not hasattr(self.timm_model, "group_matcher"):
            raise _config_error(where, f"{' and '.join(needs)} need the model's layer groups; {model_name} is "
                                       f"wrapped by timm as {type(self.body).__name__} without them (visionzoo "
                                       f"models and timm's forward_intermediates models have them)")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        if with_cp:
            self.timm_model.set_grad_checkpointing(True)
        self._frozen_modules: list[nn.Module] = []
        self._freeze_stages()

    # --- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _parse_init_cfg(where: str, init_cfg) -> dict | None:
        if init_cfg is None:
            return None
        cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
        if len(cfgs) != 1 or not isinstance(cfgs[0], dict) or cfgs[0].get("type") != "Pretrained":
            raise _config_error(where, f"init_cfg must be None or dict(type='Pretrained', checkpoint=...), got "
                                       f"{init_cfg!r} (the timm model initialises its own weights)")
        cfg = dict(cfgs[0])
        if not cfg.get("checkpoint"):
            raise _config_error(where, "init_cfg type 'Pretrained' needs checkpoint=PATH")
        unknown = set(cfg) - {"type", "checkpoint", "prefix", "use_ema", "map_location"}
        if unknown:
            raise _config_error(where, f"init_cfg has unsupported keys {sorted(unknown)}")
        return cfg

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """``{timm parameter name: layer id}`` in the family's forward order (its fine
        ``group_matcher``), and the number of layers."""
        model = self.timm_model
        ids = group_with_matcher(model.named_parameters(), model.group_matcher(coarse=False), reverse=True)
        return ids, (max(ids.values()) + 1 if ids else 0)

    def _frozen_parameter_names(self) -> set[str]:
        if self.frozen_stages < 0:
            return set()
        ids, _ = self.layer_ids()
        if self.frozen_stages == 0:
            boundary = 0
        else:
            module = self.level_modules[self.frozen_stages - 1] + "."
            inside = [i for name, i in ids.items() if name.startswith(module)]
            boundary = max(inside) if inside else max(ids.values())
        return {name for name, i in ids.items() if i <= boundary}

    def _freeze_stages(self) -> None:
        frozen = self._frozen_parameter_names()
        if not frozen:
            return
        for name, param in self.timm_model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        self._frozen_modules = [
            m for _, m in self.timm_model.named_modules()
            if any(True for _ in m.parameters(recurse=False))
            and all(not p.requires_grad for p in m.parameters(recurse=False))
        ]
        for m in self._frozen_modules:
            m.eval()

    # --- mmengine hooks ----------------------------------------------------------------------
    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint through the family's ``checkpoint_filter_fn`` (tensors only)."""
        if self._checkpoint is not None:
            load_backbone_checkpoint(
                self.timm_model, self._checkpoint["checkpoint"], model_name=self.model_name,
                full_keys=self.full_state_keys(), pyramid=self.pyramid, prefix=self._checkpoint.get("prefix"),
                use_ema=bool(self._checkpoint.get("use_ema", False)),
            )
        self._is_init = True

    def train(self, mode: bool = True) -> VisionZooBackbone:
        super().train(mode)
        if mode:
            for m in self._frozen_modules:
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, _BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(super().forward(x))
