"""timm plumbing the families share, so that each model file keeps only what its paper defines.

* :func:`build_family_model`: every family's ``_create_*`` (timm's ``build_model_with_cfg`` with the
  families' loading and feature conventions); :func:`family_cfg`: the pretrained-cfg fields they share;
* :func:`check_pool`: the one ``global_pool`` check (each family passes the pools its head takes);
* :func:`run_block` / :func:`run_blocks`: activation checkpointing through timm's ``checkpoint`` /
  ``checkpoint_seq`` (non-reentrant unless ``TIMM_REENTRANT_CKPT`` is set), on while
  ``set_grad_checkpointing(True)`` is in force and gradients are recorded;
* :class:`TimmApi`: the parts of timm's model API every family implements alike: the
  ``forward_intermediates`` signature and argument checks (each family computes its levels in
  ``_intermediates``), ``set_grad_checkpointing`` and ``get_classifier``;
* :func:`stage_intermediates` / :func:`prune_stages`: those levels and ``prune_intermediate_layers``
  for the hierarchical families built as stem -> ``stages`` (an ``nn.Sequential``, one stage per
  feature level) with optional per-stage ``feature_norms`` (BiFormer, PATNet).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import nn

from ._loading import route_sources_to_load_pretrained

# SelectAdaptivePool2d pools that keep the width (CNN-style heads) and the pools of class-token models.
MAP_POOLS = ("avg", "max", "avgmax", "")
TOKEN_POOLS = ("token", "avg", "")


def build_family_model(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable,
                       feature_indices: Sequence[int], **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` the way every family calls it.

    * A model with its own ``load_pretrained`` (the official files are whole training states) gets
      ``pretrained_cfg_overlay`` files / URLs too (:func:`route_sources_to_load_pretrained`).
    * ``features_only`` uses ``forward_intermediates`` (timm's ``getter``), by default at
      ``feature_indices`` (a caller's ``out_indices`` picks others); a family with dense output norms
      (a ``feature_norms`` keyword) builds and applies them there by default, as the official dense
      backbones norm every output.
    """
    if hasattr(model_cls, "load_pretrained"):
        route_sources_to_load_pretrained(kwargs)
    feature_cfg: dict[str, Any] = dict(feature_cls="getter", out_indices=tuple(feature_indices))
    if "feature_norms" in inspect.signature(model_cls).parameters:
        if kwargs.get("features_only"):
            kwargs.setdefault("feature_norms", True)
        feature_cfg["norm"] = kwargs.get("feature_norms", False)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


def family_cfg(url: str, family: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg: what the families share (an ImageNet-1k classifier ``head`` on 3x224x224
    images, bicubic resizing, ImageNet mean / std, a ``patch_embed.proj`` stem), then the ``family``'s
    own fields, then the variant's ``kwargs``."""
    return {"url": url, "num_classes": 1000, "input_size": (3, 224, 224), "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj",
            "classifier": "head", **family, **kwargs}


def check_pool(family: str, global_pool: str, pools: Sequence[str], num_classes: Optional[int] = None) -> None:
    """One-line ``ValueError`` for a ``global_pool`` outside ``pools``; with ``num_classes``, also for an
    unpooled output (``''``) feeding a classifier."""
    if global_pool not in pools:
        names = [repr(p) for p in pools]
        raise ValueError(f"{family}: global_pool must be {', '.join(names[:-1])} or {names[-1]}, got {global_pool!r}")
    if num_classes is not None and global_pool == "" and num_classes > 0:
        raise ValueError(f"{family}: global_pool='' (unpooled output) needs num_classes=0")


def _checkpointing(model: nn.Module) -> bool:
    return model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()


def run_block(model: nn.Module, block: nn.Module, *args):
    """``block(*args)``, recomputed in backward (timm's ``checkpoint``) while ``model`` checkpoints."""
    return checkpoint(block, *args) if _checkpointing(model) else block(*args)


def run_blocks(model: nn.Module, blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``blocks`` in order; one checkpoint per block (timm's ``checkpoint_seq``) while
    ``model`` checkpoints."""
    if _checkpointing(model):
        return checkpoint_seq(blocks, x)
    for block in blocks:
        x = block(x)
    return x


class TimmApi:
    """timm's model API as every family implements it (a mixin before ``nn.Module``).

    ``forward_intermediates`` checks the arguments; the family's ``_intermediates(x, indices, norm,
    stop_early, output_fmt, **kwargs)`` returns (final features, intermediates). ``output_fmts``: the
    layouts the family can return. ``prune_intermediate_layers`` is the family's ``_prune``. The
    ``grad_checkpointing`` flags (the model's, or its stages') are read by :func:`run_block` /
    :func:`run_blocks`; the classifier is ``head``.
    """

    output_fmts: Tuple[str, ...] = ("NCHW",)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **kwargs: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The feature levels ``indices`` picks (the last n if an int, all if None, else the listed ones),
        and the final features unless ``intermediates_only``; ``stop_early`` stops after the last level
        taken. ``norm``: a family's dense output norms (``feature_norms``), else its final norm. The
        levels each family returns: its ``_intermediates``."""
        family = type(self).__name__
        if output_fmt not in self.output_fmts:
            raise ValueError(f"{family}: output_fmt must be {' or '.join(map(repr, self.output_fmts))}, "
                             f"got {output_fmt!r}")
        if norm and getattr(self, "feature_norms", True) is None:
            raise ValueError(f"{family}: norm=True needs a model built with feature_norms=True")
        final, intermediates = self._intermediates(x, indices, norm, stop_early, output_fmt, **kwargs)
        return intermediates if intermediates_only else (final, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what follows the last level ``indices`` picks (``prune_norm``: the final / dense norms too;
        ``prune_head``: the classifier); returns timm's take indices."""
        return self._prune(indices, prune_norm, prune_head)


def stage_intermediates(model: nn.Module, stem: nn.Module, x: torch.Tensor,
                        indices: Optional[Union[int, List[int]]], norm: bool,
                        stop_early: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(last stage output, chosen stage outputs (B, C_i, H / s_i, W / s_i), each through its
    ``feature_norms`` entry when ``norm``) of ``model.stages`` run on ``stem(x)``."""
    take_indices, max_index = feature_take_indices(len(model.stages), indices)
    x = stem(x)
    stages = model.stages[:max_index + 1] if stop_early else model.stages
    intermediates = []
    for i, stage in enumerate(stages):
        x = stage(x)
        if i in take_indices:
            intermediates.append(model.feature_norms[i](x) if norm else x)
    return x, intermediates


def prune_stages(model: nn.Module, indices: Union[int, List[int]], prune_norm: bool) -> Tuple[List[int], int, bool]:
    """Drop the stages (and ``feature_norms``) after the last of ``indices``; return timm's
    ``feature_take_indices`` and whether the last stage went (the head must then be reset)."""
    take_indices, max_index = feature_take_indices(len(model.stages), indices)
    model.stages = model.stages[:max_index + 1]
    if model.feature_norms is not None:
        model.feature_norms = None if prune_norm else model.feature_norms[:max_index + 1]
    return take_indices, max_index, max_index < len(model.feature_info) - 1
