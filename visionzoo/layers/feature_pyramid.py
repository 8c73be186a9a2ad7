"""Simple feature pyramid for plain (single-stride) backbones.

Plain backbones such as Vim, DependencyViT and Sparsifiner produce stride-16 maps only; dense heads
(UPerNet, FPN detectors) want strides 4/8/16/32. Two published recipes build those:

* the official Vim / BEiT segmentation backbone (hustvl/Vim ``seg/backbone/vim.py``): four block
  outputs, one per scale, through ``ConvT2x2 -> BN -> GELU -> ConvT2x2`` (x4), ``ConvT2x2`` (x2),
  identity (x1) and ``MaxPool2`` (x0.5), channels unchanged;
* ViTDet (Li et al., arXiv 2203.16527): one map through the same up/down samplers followed by a
  1x1 + 3x3 conv projection to ``out_channels`` with LayerNorm.

``SimpleFeaturePyramid`` does both: pass four maps (one per scale) or one map (shared by all
scales), and ``out_channels=None`` (no projection, the Vim recipe) or an int (ViTDet projection).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from timm.layers import LayerNorm2d


def _scale_op(dim: int, scale: float, norm_layer: Callable[[int], nn.Module]) -> nn.Module:
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            norm_layer(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    raise ValueError(f"SimpleFeaturePyramid: unsupported scale factor {scale}; use 4, 2, 1 or 0.5")


class SimpleFeaturePyramid(nn.Module):
    """Turn stride-``s`` maps of a plain backbone into a multi-scale pyramid.

    Args:
        in_channels: channels of the backbone maps.
        scale_factors: resampling factor per output level (default: strides s/4, s/2, s, 2s).
        out_channels: ``None`` keeps ``in_channels`` (official Vim segmentation); an int adds the
            ViTDet 1x1 + 3x3 projection with LayerNorm.
        norm_layer: norm inside the x4 upsampler (the official code uses SyncBN; BN here, convert
            with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU).
    Forward:
        a list of ``len(scale_factors)`` maps (B, C, H, W), one per level, or a single map.
        Returns a list of (B, C', H * f, W * f) maps, one per scale factor.
    """

    def __init__(
        self,
        in_channels: int,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        out_channels: int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.samplers = nn.ModuleList([_scale_op(in_channels, s, norm_layer) for s in self.scale_factors])
        if out_channels is None:
            self.projections = None
            self.out_channels = in_channels
        else:
            self.projections = nn.ModuleList([
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
                for _ in self.scale_factors
            ])
            self.out_channels = out_channels

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            features = [features] * len(self.samplers)
        if len(features) != len(self.samplers):
            raise ValueError(
                f"SimpleFeaturePyramid expects 1 or {len(self.samplers)} feature maps, got {len(features)}"
            )
        outs = [sampler(f) for sampler, f in zip(self.samplers, features)]
        if self.projections is not None:
            outs = [proj(o) for proj, o in zip(self.projections, outs)]
        return outs


def plain_feature_indices(depth: int) -> tuple[int, ...]:
    """Default ``out_indices`` of a plain (single-stride) backbone: the last block of each quarter of the
    depth, ViTDet's / the Vim segmentation backbone's taps ([5, 11, 17, 23] at depth 24); every block
    when there are fewer than four."""
    return tuple(range(depth)) if depth < 4 else tuple(depth * k // 4 - 1 for k in range(1, 5))
