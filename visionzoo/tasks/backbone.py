"""Backbones for dense tasks: any timm / visionzoo model as a stride-(4, 8, 16, 32) feature pyramid.

:class:`PyramidBackbone` is :class:`visionzoo.layers.DenseBackbone` (``timm.create_model(name,
features_only=True)``, the timm way, DESIGN §4) asked for fixed strides:

* hierarchical models (PATNet, BiFormer, ResNet, ConvNeXt, ...) already give one map per stride;
  the levels of the requested strides are used as they come;
* plain models (Vim, DependencyViT, Sparsifiner, ViT: every ``feature_info.reduction()`` equal) give
  stride-``s`` maps only. They are created with ``dynamic_img_size=True`` (dense tasks feed any size)
  and go through :class:`visionzoo.layers.SimpleFeaturePyramid`: with four tapped blocks, one per
  scale (the official Vim/BEiT segmentation recipe), otherwise the last map shared by every scale
  (the ViTDet recipe). Levels the pyramid's samplers cannot reach (stride 32 from a stride-8 model)
  are max-pooled from the level below.
"""
from __future__ import annotations

from typing import Any, Sequence

import timm
from torch import nn

from ..data.errors import InputError
from ..layers.dense import DenseBackbone, probe_dense

__all__ = ["PyramidBackbone", "check_model_name", "is_plain_model", "create_backbone_model"]


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

    Decided from a copy built on the meta device (no memory, no weights).
    """
    check_model_name(name)
    return probe_dense(name, **kwargs).plain


def create_backbone_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, adding ``dynamic_img_size=True`` for plain models."""
    if is_plain_model(name):
        kwargs.setdefault("dynamic_img_size", True)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


class PyramidBackbone(DenseBackbone):
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
        check_model_name(name)
        out_indices = kwargs.pop("out_indices", None)
        strides = tuple(int(s) for s in out_strides)
        super().__init__(name, pretrained, out_indices=out_indices, out_strides=strides, model_kwargs=kwargs)
        self.out_strides = strides
