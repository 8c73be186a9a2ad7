"""Backbones for dense tasks: any timm / visionzoo model as a stride-(4, 8, 16, 32) feature pyramid.

The backbone is ``timm.create_model(name, features_only=True)``, the timm way (DESIGN §4):

* hierarchical models (PATNet, BiFormer, ResNet, ConvNeXt, ...) already give one map per stride;
  the four last levels are used as they come;
* plain models (Vim, DependencyViT, Sparsifiner, ViT: every ``feature_info.reduction()`` equal) give
  stride-``s`` maps only. They are created with ``dynamic_img_size=True`` (dense tasks feed any size)
  and go through :class:`visionzoo.layers.SimpleFeaturePyramid`: with four tapped blocks, one per
  scale (the official Vim/BEiT segmentation recipe), otherwise the last map shared by every scale
  (the ViTDet recipe). Levels the pyramid's samplers cannot reach (stride 32 from a stride-8 model)
  are max-pooled from the level below.
"""
from __future__ import annotations

import functools
import math
from typing import Any, List, Optional, Sequence

import timm
import torch
from torch import nn

from ..data.errors import InputError
from ..layers import SimpleFeaturePyramid

__all__ = ["PyramidBackbone", "check_model_name", "is_plain_model", "create_backbone_model"]

_PYRAMID_FACTORS = (4.0, 2.0, 1.0, 0.5)


def check_model_name(name: str) -> None:
    """Raise a one-line :class:`InputError` for a name neither visionzoo nor timm registers."""
    if not timm.is_model(name):
        import visionzoo

        raise InputError(
            f"unknown model {name!r}: not a registered timm/visionzoo model "
            f"(visionzoo has: {', '.join(visionzoo.list_models())})"
        )


def is_plain_model(name: str, **kwargs: Any) -> bool:
    """True when every feature level of ``name`` has the same stride (a plain / ViT-style model).

    Decided from a ``features_only`` copy built on the meta device (no memory, no weights).
    """
    check_model_name(name)
    if not kwargs:
        return _is_plain_cached(name)
    with torch.device("meta"):
        probe = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    return len(set(probe.feature_info.reduction())) == 1


@functools.lru_cache(maxsize=None)
def _is_plain_cached(name: str) -> bool:
    with torch.device("meta"):
        probe = timm.create_model(name, features_only=True, pretrained=False)
    return len(set(probe.feature_info.reduction())) == 1


def create_backbone_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, adding ``dynamic_img_size=True`` for plain models."""
    if is_plain_model(name):
        kwargs.setdefault("dynamic_img_size", True)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class PyramidBackbone(nn.Module):
    """A features-only backbone returning maps at ``out_strides`` (default 4, 8, 16, 32).

    Args:
        name: timm / visionzoo model name.
        pretrained: load the model's pretrained weights (timm's mechanism).
        out_strides: strides of the returned levels, each a power of two.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``out_indices``, ...).
    Attributes:
        out_channels: channels per returned level.
        plain: whether the backbone needed the simple feature pyramid.
        body: the timm features-only module; ``body.model`` is the timm model (``group_matcher``).
    Forward:
        (B, 3, H, W) -> list of (B, C_i, H / s_i, W / s_i), one per ``out_strides`` entry.
    """

    def __init__(self, name: str, pretrained: bool = False, out_strides: Sequence[int] = (4, 8, 16, 32),
                 **kwargs: Any):
        super().__init__()
        # structure-changing kwargs (depth, ...) need their own probe; the usual ones do not
        probe_kwargs = {k: v for k, v in kwargs.items() if k not in ("out_indices", "drop_path_rate", "drop_rate")}
        self.plain = is_plain_model(name, **probe_kwargs)
        if self.plain:
            kwargs.setdefault("dynamic_img_size", True)
        self.body = timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
        self.out_strides = tuple(int(s) for s in out_strides)
        reductions = self.body.feature_info.reduction()
        channels = self.body.feature_info.channels()
        self.pyramid: Optional[SimpleFeaturePyramid] = None
        self.extra_pools = nn.ModuleList()
        if self.plain:
            stride = reductions[0]
            factors = [stride / t for t in self.out_strides]
            self._per_level = len(reductions) == len(self.out_strides)
            reachable = [f for f in factors if f >= 0.5]
            for f in reachable:
                if f not in _PYRAMID_FACTORS:
                    raise ValueError(f"PyramidBackbone: {name} has stride {stride}; cannot make strides "
                                     f"{self.out_strides} (scale factor {f} not in {_PYRAMID_FACTORS})")
            self.pyramid = SimpleFeaturePyramid(channels[-1], scale_factors=reachable)
            for f in factors[len(reachable):]:
                self.extra_pools.append(nn.MaxPool2d(kernel_size=2, stride=2))  # halves the previous level
                if not math.log2(0.5 / f).is_integer():
                    raise ValueError(f"PyramidBackbone: out_strides must be powers of two, got {self.out_strides}")
            self.out_channels = [channels[-1]] * len(self.out_strides)
            self._levels: List[int] = []
        else:
            self._levels = []
            for t in self.out_strides:
                if t not in reductions:
                    raise ValueError(f"PyramidBackbone: {name} has strides {reductions}, no stride-{t} level")
                self._levels.append(reductions.index(t))
            self.out_channels = [channels[i] for i in self._levels]

    @property
    def timm_model(self) -> nn.Module:
        """The timm model inside the features wrapper (owner of ``group_matcher``)."""
        return getattr(self.body, "model", self.body)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.body(x)
        if isinstance(feats, dict):
            feats = list(feats.values())
        if not self.plain:
            return [feats[i] for i in self._levels]
        n_reach = len(self.out_strides) - len(self.extra_pools)
        if self._per_level:
            outs = self.pyramid(list(feats[:n_reach]))
        else:
            outs = self.pyramid(feats[-1])
        for pool in self.extra_pools:
            outs.append(pool(outs[-1]))
        return outs
