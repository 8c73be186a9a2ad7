"""Any timm / visionzoo model as a dense-prediction backbone: the one adapter under ``visionzoo.tasks``
(:class:`visionzoo.tasks.PyramidBackbone`) and ``visionzoo.mm`` (``visionzoo.Backbone``).

:class:`DenseBackbone` wraps ``timm.create_model(name, features_only=True)``, the timm way (DESIGN §4):

* a ``features_only`` copy built on the meta device (no memory, no weights) tells plain models
  (Vim, DependencyViT, Sparsifiner, ViT: one stride for every feature level) from hierarchical ones
  (BiFormer, OverLoCK, PATNet, ResNet, ...), names the module behind each level, and says whether the
  family has dense output norms;
* the families' dense output norms are one constructor keyword, ``feature_norms``; they are on unless
  asked off, as the official dense backbones (and the families' ``features_only`` default) have them;
* plain models are built with ``dynamic_img_size=True`` (dense inputs come in any size) and go through
  :class:`~visionzoo.layers.SimpleFeaturePyramid`: four tapped blocks give one map per scale (the
  official Vim / BEiT segmentation recipe), otherwise the last map is shared by every scale (ViTDet).
  Levels the samplers cannot reach (stride 32 from a stride-8 model) are max-pooled from the level below;
* timm's dict outputs become a list.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import timm
import torch
from torch import nn

from .feature_pyramid import SimpleFeaturePyramid

__all__ = ["DenseBackbone", "DenseProbe", "probe_dense"]

# The simple feature pyramid's samplers: x4, x2, x1, x0.5 of the plain model's stride.
_PYRAMID_FACTORS = (4.0, 2.0, 1.0, 0.5)
# Keywords that change neither the feature levels nor whether the family has dense output norms.
_PROBE_IGNORES = ("pretrained", "features_only", "out_indices", "feature_norms", "drop_path_rate", "drop_rate")


@dataclass(frozen=True)
class DenseProbe:
    """What a meta-device ``features_only`` copy of a model says about its feature levels (all of them)."""

    plain: bool  # every level has the same stride
    reductions: tuple[int, ...]  # stride per feature level
    modules: tuple[str, ...]  # the module computing each level, in forward order
    feature_norms: bool  # the family takes ``feature_norms`` (dense output norms)


def probe_dense(name: str, **kwargs: Any) -> DenseProbe:
    """Build ``name`` on the meta device and read its feature levels (cached for hashable keywords)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _PROBE_IGNORES}
    key = tuple(sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:  # an unhashable keyword (a list): probe without the cache
        return _probe(name, kwargs)
    return _probe_cached(name, key)


@functools.lru_cache(maxsize=None)
def _probe_cached(name: str, items: tuple) -> DenseProbe:
    return _probe(name, dict(items))


def _probe(name: str, kwargs: dict[str, Any]) -> DenseProbe:
    # features_only, so the family's dense defaults apply (OverLoCK's h_proj needs its feature_norms)
    with torch.device("meta"):
        features = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    model = getattr(features, "model", None)  # FeatureGetterNet keeps the model; FeatureListNet (ResNet) its modules
    levels = list(model.feature_info) if model is not None else features.feature_info.get_dicts()
    reductions = tuple(int(info["reduction"]) for info in levels)
    return DenseProbe(plain=len(set(reductions)) == 1, reductions=reductions,
                      modules=tuple(info["module"] for info in levels),
                      feature_norms=model is not None and "feature_norms" in inspect.signature(type(model)).parameters)


class DenseBackbone(nn.Module):
    """A ``features_only`` timm model returning a list of feature maps, a pyramid for plain models.

    Args:
        name: a registered timm / visionzoo model.
        pretrained: load the model's pretrained weights (timm's mechanism).
        out_indices: feature levels to take (default: the model's own dense default).
        out_strides: the strides to return, each a power of two: hierarchical models return the level of
            each stride; plain models resample to them. ``None``: every level of a hierarchical model, and
            strides (s/4, s/2, s, 2s) of a stride-``s`` plain model.
        pyramid: plain models only: ``"auto"`` / ``True`` adds the simple feature pyramid, ``False``
            returns the plain maps as they are (``True`` on a hierarchical model is an error).
        pyramid_channels: ``None`` keeps the backbone width (Vim recipe); an int adds ViTDet's projection.
        feature_norms: the families' dense output norms; ``None`` keeps them on (the dense default).
        model_kwargs: further ``timm.create_model`` keywords (``drop_path_rate``, ``img_size``, ...).
        **module_kwargs: passed to the next base class (``init_cfg`` for mmengine's ``BaseModule``).
    Attributes:
        body: the timm ``features_only`` module; :attr:`timm_model` is the timm model inside it.
        plain: whether the model has a single stride (and so the pyramid).
        out_channels, strides: per returned level.
        level_modules: the module computing each feature level of the whole model, in forward order.
    Forward:
        (B, 3, H, W) -> list of (B, C_i, H / s_i, W / s_i), one per returned level.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        *,
        out_indices: Sequence[int] | None = None,
        out_strides: Sequence[int] | None = None,
        pyramid: str | bool = "auto",
        pyramid_channels: int | None = None,
        feature_norms: bool | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **module_kwargs: Any,
    ):
        super().__init__(**module_kwargs)
        if pyramid not in ("auto", True, False):
            raise ValueError(f"pyramid must be 'auto', True or False, got {pyramid!r}")
        kwargs = dict(model_kwargs or {})
        probe = probe_dense(name, **kwargs)
        if probe.feature_norms:  # explicit, so the whole model (full_state_keys) matches the features_only one
            kwargs["feature_norms"] = bool(feature_norms) if feature_norms is not None else kwargs.get("feature_norms", True)
        elif feature_norms:
            raise ValueError(f"feature_norms=True, but {name} has no dense output norms")
        if probe.plain:
            kwargs.setdefault("dynamic_img_size", True)
        self.model_name = name
        self.model_kwargs = kwargs  # the whole model's keywords (no features_only / out_indices / pretrained)
        self.level_modules = probe.modules
        self.plain = probe.plain

        n = len(probe.modules)
        features = dict(kwargs, features_only=True, pretrained=pretrained)
        if out_indices is not None:
            out_indices = tuple(int(i) for i in out_indices)
            if not out_indices or any(not -n <= i < n for i in out_indices):
                raise ValueError(f"out_indices {out_indices} out of range: {name} has {n} feature levels "
                                 f"(indices 0..{n - 1})")
            features["out_indices"] = tuple(i % n for i in out_indices)
        self.body = timm.create_model(name, **features)
        self.out_indices = tuple(self.body.feature_info.out_indices)
        channels = self.body.feature_info.channels()
        reductions = self.body.feature_info.reduction()

        self.pyramid: Optional[SimpleFeaturePyramid] = None
        self.extra_pools = nn.ModuleList()
        self._levels: Optional[List[int]] = None
        if pyramid is True and not self.plain:
            raise ValueError(f"pyramid=True is for plain backbones; {name} already has strides {tuple(reductions)}")
        if self.plain and pyramid in ("auto", True):
            stride = reductions[-1]
            factors = [stride / t for t in out_strides] if out_strides is not None else list(_PYRAMID_FACTORS)
            reachable = [f for f in factors if f >= 0.5]
            for f in reachable:
                if f not in _PYRAMID_FACTORS:
                    raise ValueError(f"{name} has stride {stride}; cannot make strides {tuple(out_strides)} "
                                     f"(scale factor {f} not in {_PYRAMID_FACTORS})")
            for f in factors[len(reachable):]:
                if not math.log2(0.5 / f).is_integer():
                    raise ValueError(f"out_strides must be powers of two, got {tuple(out_strides)}")
                self.extra_pools.append(nn.MaxPool2d(kernel_size=2, stride=2))  # halves the previous level
            self._per_level = len(channels) == len(factors)  # one tapped block per scale
            self.pyramid = SimpleFeaturePyramid(channels[-1], scale_factors=reachable, out_channels=pyramid_channels)
            self.out_channels = [self.pyramid.out_channels] * len(factors)
            self.strides = [int(stride / f) for f in factors]
        else:
            if pyramid_channels is not None:
                raise ValueError("pyramid_channels needs the simple feature pyramid (plain backbones)")
            self.out_channels, self.strides = list(channels), list(reductions)
            if out_strides is not None:
                missing = [t for t in out_strides if t not in reductions]
                if missing:
                    raise ValueError(f"{name} has strides {reductions}, no stride-{missing[0]} level")
                self._levels = [reductions.index(t) for t in out_strides]
                self.out_channels = [channels[i] for i in self._levels]
                self.strides = list(out_strides)

    @property
    def timm_model(self) -> nn.Module:
        """The timm model inside the features wrapper (owner of ``group_matcher``)."""
        return getattr(self.body, "model", self.body)

    def full_state_keys(self) -> frozenset[str]:
        """State-dict keys of the whole model before ``features_only`` pruned it (built on the meta device)."""
        with torch.device("meta"):
            model = timm.create_model(self.model_name, pretrained=False, **self.model_kwargs)
        return frozenset(model.state_dict())

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if self.pyramid is None:
            return list(feats) if self._levels is None else [feats[i] for i in self._levels]
        n_reach = len(self.out_channels) - len(self.extra_pools)
        outs = self.pyramid(list(feats[:n_reach]) if self._per_level else feats[-1])
        for pool in self.extra_pools:
            outs.append(pool(outs[-1]))
        return outs
