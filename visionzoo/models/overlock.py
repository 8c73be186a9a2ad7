"""OverLoCK: an Overview-first, Look-Closely-next ConvNet with context-mixing dynamic kernels.

Paper: "OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
Lou & Yu, CVPR 2025, arXiv 2502.20087. Official code: https://github.com/LMMMEng/OverLoCK (Apache-2.0),
``models/overlock.py`` (classification), ``{detection,segmentation}/models/overlock.py`` (dense
backbones). The code was read for its semantics; this is a re-implementation that needs neither NATTEN
nor mmengine and prints nothing.

Architecture (dims ``C0..C3``, context width ``Cc = C3 // 4``, fusion width ``C3 + Cc``):

* **Base-Net**: a 4-conv stem (stride 4) and stride-2 ``conv3x3 + BN`` downsamplers; stages 1-3 are
  RepConv blocks: ``x += DW3x3(x); x = ls(x) + proj(x)`` with ``proj = LN -> DilatedReparam(K) -> BN ->
  SE -> 1x1 (4x) -> GELU -> ResDW3x3 -> GRN -> 1x1 -> DropPath``. ``LayerScale`` (a depthwise 1x1 conv
  with bias, stages 3-4 only) sits on the **identity** branch (the official ``res_scale=True``, used by
  every variant; the other branch of that flag is not reproduced).
* **Overview-Net**: ``patch_embed4`` + ``blocks4`` (K=7) at stride 32 give the context ``ctx_cls``;
  ``aux_head`` (BN -> GAP -> linear) supervises it in training (loss weight 0.4 in the official recipe).
* **Focus-Net**: ``high_level_proj`` (1x1, C3 -> Cc) gives ``ctx_ori``, bilinearly resized to stride 16
  (``ctx_up``); ContMix blocks ``sub_blocks3`` run at stride 16 (dim C2), ``patch_embedx`` downsamples
  x and the context, ``sub_blocks4`` run at stride 32 (dim C3) and the last returns ``cat[x, ctx]``.
  Every ContMix block but the first re-injects the context: ``h = x_scale(h) + h_scale(ctx_ref)``.
* **Head**: ``1x1 (fusion -> 1024, no bias) -> BN -> SiLU -> GAP -> linear``; the projection comes
  **before** the pool, so ``global_pool=''`` returns the unprojected fusion map (needs ``num_classes=0``).

ContMix (:class:`ContMixBlock`, official ``DynamicConvBlock``): per pixel and group, dynamic kernels
``softmax(q . k_region W + rpb)`` over a 5x5 and a KxK clamped window (NATTEN ``na2d_av`` semantics, run by
:mod:`visionzoo.ops.neighborhood_aggregation`) with keys from ``P x P = 7 x 7`` region centres of the
context (``ctx_pool_size``, issue #39), query scale ``(C / G) ** -0.5`` although each group has
``C / (2G)`` channels (kept: the weights depend on it), and zero-initialised relative-position biases.
The official ``weight_proj`` (a 1x1 conv over the 49 region logits) is applied to the keys before the
product with the queries (``q . (k W^T)`` instead of ``(q . k) W^T``): the same numbers up to summation
order, 3x fewer MACs at 224. Maps smaller than the window are bilinearly resized so the short side is K
and pooled back afterwards, as the official code does (gate and lepe are computed before the resize).

Parameter forms. The registered default is the **deploy form** (``deploy=True``: every
DilatedReparam block is one KxK depthwise conv with bias) **without** the auxiliary head, because that is
what the paper's parameter counts describe (XT 16,453,712 ... B 94,942,528) and what inference uses.
The official training form is ``deploy=False, use_aux_head=True`` (XT 17,307,272): it trains the dilated
branches, returns ``dict(main=..., aux=...)`` in training mode, and ``reparameterize()`` (or timm's
``reparameterize_model``) folds it into the deploy form exactly (float64 fold). Both release files load
into the deploy form (``checkpoint_filter_fn`` folds a training-form file on load); a ``_reparam``
file cannot be loaded into the training form (the branches are gone) and raises a ``ValueError``.

Dense prediction: ``features_only=True`` gives strides 4/8/16/32 with the official dense channels
``[C0, C1, C2 + Cc, C3 + Cc]``, each through a ``feature_norms`` LayerNorm (the official ``extra_norm``; on
by default there); with ``h_proj=True`` the stride-32 output adds ``h_proj(feature_norms[4](ctx))`` as the
official detection
backbone does (the segmentation backbone does not). Any input of at least 32x32 works; the context is
resized to the stride-16 map's size (the official classifier uses ``scale_factor=2``, which fails when
the stride-16 map is odd; the two agree otherwise).
"""
from __future__ import annotations

import argparse
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_module

from ..ops.neighborhood_aggregation import na2d_av, na2d_rpb
from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import MAP_POOLS, TimmApi, build_family_model, check_pool, family_cfg, run_block, run_blocks

__all__ = ["OverLoCK", "ContMixBlock", "RepConvBlock", "DilatedReparamBlock"]

# Branches of UniRepLKNet's DilatedReparamBlock per large kernel: (kernel sizes, dilations).
_DILATED_BRANCHES = {
    19: ((5, 7, 9, 9, 3, 3, 3), (1, 1, 1, 2, 4, 5, 7)),
    17: ((5, 7, 9, 3, 3, 3), (1, 1, 2, 4, 5, 7)),
    15: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 5, 7)),
    13: ((5, 7, 7, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    11: ((5, 7, 5, 3, 3, 3), (1, 1, 2, 3, 4, 5)),
    9: ((5, 7, 5, 3, 3), (1, 1, 2, 3, 4)),
    7: ((5, 3, 3, 3), (1, 1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


# --- reparameterisation (shared by the module and checkpoint_filter_fn) -------------------------
def _bn_fold(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: Dict[str, torch.Tensor],
             eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``BN(conv(x))`` as one conv: (weight, bias) in float64. ``bn`` holds weight/bias/running stats."""
    scale = bn["weight"].double() / torch.sqrt(bn["running_var"].double() + eps)
    b = 0.0 if bias is None else bias.double()
    return weight.double() * scale.reshape(-1, 1, 1, 1), bn["bias"].double() + (b - bn["running_mean"].double()) * scale


def _dilate(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """A depthwise ``(C, 1, k, k)`` kernel with dilation ``r`` as a dense ``(C, 1, r(k-1)+1, ...)`` one."""
    if dilation == 1:
        return kernel
    C, _, k, _ = kernel.shape
    size = dilation * (k - 1) + 1
    out = kernel.new_zeros(C, 1, size, size)
    out[:, :, ::dilation, ::dilation] = kernel
    return out


def merge_dilated_branches(lk_weight: torch.Tensor, origin_bn: Dict[str, torch.Tensor],
                           branches: Sequence[Tuple[int, torch.Tensor, Dict[str, torch.Tensor]]],
                           bn_eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(lk(x)) + sum_r BN_r(dilated_r(x))`` into one ``K x K`` depthwise conv (float64 result).

    ``branches`` lists ``(dilation, weight, bn)``; each branch's equivalent kernel is centred in ``K x K``.
    """
    weight, bias = _bn_fold(lk_weight, None, origin_bn, bn_eps)
    K = weight.shape[-1]
    for dilation, w, bn in branches:
        bw, bb = _bn_fold(w, None, bn, bn_eps)
        bw = _dilate(bw, dilation)
        pad = K // 2 - bw.shape[-1] // 2
        weight = weight + F.pad(bw, [pad] * 4)
        bias = bias + bb
    return weight, bias


def _bn_dict(bn: nn.BatchNorm2d) -> Dict[str, torch.Tensor]:
    return dict(weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var)


# --- layers ------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """Per-channel ``x * w + b`` stored as the official depthwise 1x1 conv: weight (C, 1, 1, 1), bias (C,)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * w + b elementwise: the official grouped 1x1 conv computes the same, but PyTorch's CPU
        # kernel runs it as one tiny convolution per channel (~40% of an XT forward on a CPU).
        C = x.shape[1]
        return torch.addcmul(self.bias.view(1, C, 1, 1), x, self.weight.view(1, C, 1, 1))


class GRN(nn.Module):
    """Global response norm (ConvNeXt V2), NCHW: ``(gamma * N(x) + 1) * x + beta`` with
    ``N(x) = ||x||_HW / (mean_C ||x||_HW + 1e-6)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(-1, -2), keepdim=True)  # (B, C, 1, 1)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return (self.gamma * nx + 1) * x + self.beta


class SEModule(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(1x1(GELU(1x1(GAP(x)))))``, hidden width ``max(16, C // 8)``."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        hidden = max(16, dim // reduction)
        self.proj = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(x)


class ResDWConv(nn.Conv2d):
    """``x + DWConv_k(x)`` (depthwise, with bias)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet's dilated reparam block: ``BN(DW_K(x)) + sum_r BN_r(DW_{k_r, dilation r}(x))``.

    ``deploy=True`` builds the folded form, a single biased ``K x K`` depthwise conv (``lk_origin``).
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size not in _DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock: kernel_size must be one of {sorted(_DILATED_BRANCHES)}, "
                             f"got {kernel_size}")
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilates = _DILATED_BRANCHES[kernel_size]
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                   bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                setattr(self, f"dil_conv_k{k}_{r}", nn.Conv2d(channels, channels, k, padding=(r * (k - 1) + 1) // 2,
                                                              dilation=r, groups=channels, bias=False))
                setattr(self, f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    @property
    def deploy(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Depthwise convs run on a channels-last copy: PyTorch's CPU kernel for large NCHW depthwise
        # kernels loops over channels (``_slow_conv2d``) and is 6-18x slower at 13-17 taps; the oneDNN
        # path it takes for channels-last input is not. The result goes back to NCHW (same numbers).
        x = x.contiguous(memory_format=torch.channels_last)
        if self.deploy:
            return self.lk_origin(x).contiguous()
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            out = out + getattr(self, f"dil_bn_k{k}_{r}")(getattr(self, f"dil_conv_k{k}_{r}")(x))
        return out.contiguous()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BNs and dilated branches into ``lk_origin`` (in place; use in eval mode)."""
        if self.deploy:
            return
        branches = [(r, getattr(self, f"dil_conv_k{k}_{r}").weight, _bn_dict(getattr(self, f"dil_bn_k{k}_{r}")))
                    for k, r in zip(self.kernel_sizes, self.dilates)]
        weight, bias = merge_dilated_branches(self.lk_origin.weight, _bn_dict(self.origin_bn), branches,
                                              self.origin_bn.eps)
        old = self.lk_origin
        self.lk_origin = nn.Conv2d(old.in_channels, old.out_channels, self.kernel_size, padding=self.kernel_size // 2,
                                   groups=old.groups, bias=True, device=old.weight.device, dtype=old.weight.dtype)
        self.lk_origin.weight.copy_(weight.to(old.weight.dtype))
        self.lk_origin.bias.copy_(bias.to(old.weight.dtype))
        del self.origin_bn
        for k, r in zip(self.kernel_sizes, self.dilates):
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")


@register_notrace_module  # validates the input with Python control flow
class Stem(nn.Sequential):
    """conv3x3/2 (-> C/2) BN GELU, conv3x3 BN GELU, conv3x3/2 (-> C) BN GELU, conv3x3 BN; no conv bias."""

    def __init__(self, in_chans: int, dim: int, min_size: int = 32):
        half = dim // 2
        super().__init__(
            nn.Conv2d(in_chans, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False), nn.BatchNorm2d(dim),
        )
        self.in_chans = in_chans
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"OverLoCK expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"OverLoCK: model built for {self.in_chans} input channels, got {x.shape[1]}")
        if x.shape[2] < self.min_size or x.shape[3] < self.min_size:
            raise ValueError(f"OverLoCK needs images of at least {self.min_size}x{self.min_size} (stride 32), "
                             f"got {x.shape[2]}x{x.shape[3]}")
        return super().forward(x)


def _downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(out_dim))


class CtxDownsample(nn.Module):
    """Focus-Net stride-2 step: ``x_proj`` (C2 -> C3) on features, ``h_proj`` (Cc -> Cc) on the context."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        ctx_dim = out_dim // 4
        self.x_proj = _downsample(dim, out_dim)
        self.h_proj = _downsample(ctx_dim, ctx_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.x_proj(x), self.h_proj(ctx)


# --- blocks ------------------------------------------------------------------------------------
class RepConvBlock(nn.Module):
    """Base-/Overview-Net block: ``x += DW3x3(x); x = ls(x) + proj(x)`` (see the module docstring)."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, ls_init_value: Optional[float] = None,
                 drop_path: float = 0.0, deploy: bool = False):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.dwconv = ResDWConv(dim, 3)
        self.proj = nn.Sequential(
            LayerNorm2d(dim, eps=1e-6),
            DilatedReparamBlock(dim, kernel_size, deploy=deploy),
            nn.BatchNorm2d(dim),
            SEModule(dim),
            nn.Conv2d(dim, mlp_dim, 1),
            nn.GELU(),
            ResDWConv(mlp_dim, 3),
            GRN(mlp_dim),
            nn.Conv2d(mlp_dim, dim, 1),
            DropPath(drop_path) if drop_path > 0 else nn.Identity(),
        )
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x)
        return self.ls(x) + self.proj(x)


@register_notrace_module  # resizes maps smaller than the window (Python control flow on shapes)
class ContMixBlock(nn.Module):
    """Focus-Net block with ContMix dynamic kernels (official ``DynamicConvBlock``, same state-dict keys).

    ``forward(x (B, C, H, W), h (B, Cc, H, W), h_ref (B, Cc, H, W))`` returns ``(x, h)`` split again, or
    ``(cat[x, h] (B, C + Cc, H, W), None)`` for the last block.

    Args:
        dim: ``C``; ctx_dim: ``Cc``; num_groups: ``G`` kernels per pixel (official ``2 * sub_num_heads``),
            each applied to ``C / (2G)`` channels of one half of ``x`` (5x5 half, KxK half).
        kernel_size: ``K`` of the large dynamic kernel and of the lepe DilatedReparam block.
        smk_size: the small dynamic kernel (5). ctx_pool_size: ``P``, region centres per side (7).
        backend: :func:`visionzoo.ops.neighborhood_aggregation.na2d_av` backend.
    """

    def __init__(self, dim: int, ctx_dim: int, kernel_size: int = 7, smk_size: int = 5, num_groups: int = 4,
                 mlp_ratio: float = 3.0, ls_init_value: Optional[float] = None, drop_path: float = 0.0,
                 is_first: bool = False, is_last: bool = False, ctx_pool_size: int = 7, deploy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if dim % (2 * num_groups):
            raise ValueError(f"ContMix: dim={dim} must be divisible by 2 * num_groups = {2 * num_groups}")
        if smk_size > kernel_size or smk_size % 2 == 0:
            raise ValueError(f"ContMix: smk_size={smk_size} must be odd and <= kernel_size={kernel_size}")
        out_dim = dim + ctx_dim
        mlp_dim = int(dim * mlp_ratio)
        self.dim, self.ctx_dim = dim, ctx_dim
        self.kernel_size, self.smk_size = kernel_size, smk_size
        self.num_groups = num_groups
        self.scale = (dim // num_groups) ** -0.5  # official: head_dim = C / G, although groups hold C / (2G)
        self.is_first, self.is_last = is_first, is_last
        self.backend = backend

        if not is_first:
            self.x_scale = LayerScale(ctx_dim, 1.0)
            self.h_scale = LayerScale(ctx_dim, 1.0)
        self.dwconv1 = ResDWConv(out_dim, 3)
        self.norm1 = LayerNorm2d(out_dim, eps=1e-6)
        self.fusion = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim), nn.BatchNorm2d(out_dim), nn.GELU(),
            nn.Conv2d(out_dim, dim, 1), GRN(dim),
        )
        self.weight_query = nn.Sequential(nn.Conv2d(dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2))
        self.weight_key = nn.Sequential(
            nn.AdaptiveAvgPool2d(ctx_pool_size), nn.Conv2d(ctx_dim, dim // 2, 1, bias=False), nn.BatchNorm2d(dim // 2),
        )
        self.weight_proj = nn.Conv2d(ctx_pool_size ** 2, kernel_size ** 2 + smk_size ** 2, 1)
        self.dyconv_proj = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.lepe = nn.Sequential(DilatedReparamBlock(dim, kernel_size, deploy=deploy), nn.BatchNorm2d(dim))
        self.se_layer = SEModule(dim)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.SiLU())
        self.proj = nn.Sequential(nn.BatchNorm2d(dim), nn.Conv2d(dim, out_dim, 1))
        self.dwconv2 = ResDWConv(out_dim, 3)
        self.norm2 = LayerNorm2d(out_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Conv2d(out_dim, mlp_dim, 1), nn.GELU(), ResDWConv(mlp_dim, 3), GRN(mlp_dim), nn.Conv2d(mlp_dim, out_dim, 1),
        )
        self.ls1 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls2 = LayerScale(out_dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # Relative-position biases, NATTEN layout (G, 2k-1, 2k-1); zero init as in models/overlock.py.
        self.rpb1 = nn.Parameter(torch.zeros(num_groups, 2 * smk_size - 1, 2 * smk_size - 1))
        self.rpb2 = nn.Parameter(torch.zeros(num_groups, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def _dynamic_conv(self, x: torch.Tensor, x_f: torch.Tensor) -> torch.Tensor:
        """ContMix proper on ``x`` (B, C, H, W) with weights from ``x_f`` (B, C + Cc, H, W); H, W >= K."""
        B, C, H, W = x.shape
        if B == 0:  # an empty batch: nothing to aggregate (the kernels and reshapes need an image)
            return torch.zeros_like(x)
        G, c = self.num_groups, C // (2 * self.num_groups)
        query, key = torch.split(x_f, [C, self.ctx_dim], dim=1)
        q = (self.weight_query(query) * self.scale).reshape(B, G, c, H * W)  # (B, G, c, HW)
        k = self.weight_key(key).reshape(B, G, c, -1)  # (B, G, c, P*P)
        # official: logits = weight_proj(q^T k) over the region axis; here q^T (k W^T) + b (reassociated)
        proj = self.weight_proj.weight.flatten(1)  # (K^2 + s^2, P*P)
        logits = q.transpose(-1, -2) @ (k @ proj.t()) + self.weight_proj.bias  # (B, G, HW, s^2 + K^2)
        logits = logits.reshape(B, G, H, W, -1)
        s2 = self.smk_size ** 2
        attn1 = torch.softmax(logits[..., :s2] + na2d_rpb(self.rpb1, H, W, self.smk_size), dim=-1)
        attn2 = torch.softmax(logits[..., s2:] + na2d_rpb(self.rpb2, H, W, self.kernel_size), dim=-1)
        value = x.reshape(B, 2, G, c, H, W).permute(1, 0, 2, 4, 5, 3)  # (2, B, G, H, W, c): '(m g c)' split
        x1 = na2d_av(attn1, value[0], self.smk_size, backend=self.backend)  # (B, G, H, W, c)
        x2 = na2d_av(attn2, value[1], self.kernel_size, backend=self.backend)
        return torch.cat([x1, x2], dim=1).permute(0, 1, 4, 2, 3).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor, h_x: torch.Tensor, h_r: torch.Tensor
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        C = x.shape[1]
        if not self.is_first:
            h_x = self.x_scale(h_x) + self.h_scale(h_r)
        x_f = self.dwconv1(torch.cat([x, h_x], dim=1))
        identity = x_f
        x_f = self.norm1(x_f)
        x = self.fusion(x_f)
        gate = self.gate(x)
        lepe = self.lepe(x)

        H, W = x.shape[-2:]
        if min(H, W) < self.kernel_size:
            # official: bilinear resize so the short side is K (same float arithmetic), pool back after
            K = self.kernel_size
            size = (K, int(K / H * W)) if H < W else (int(K / W * H), K)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x_f = F.interpolate(x_f, size=size, mode="bilinear", align_corners=False)
            x = F.adaptive_avg_pool2d(self._dynamic_conv(x, x_f), (H, W))
        else:
            x = self._dynamic_conv(x, x_f)

        x = self.se_layer(self.dyconv_proj(x) + lepe)
        x = self.proj(gate * x)
        x = self.ls1(identity) + self.drop_path(x)
        x = self.dwconv2(x)
        x = self.ls2(x) + self.drop_path(self.mlp(self.norm2(x)))
        if self.is_last:
            return x, None
        x, h = torch.split(x, [C, self.ctx_dim], dim=1)
        return x, h


class AuxHead(nn.Module):
    """Overview-Net deep supervision: BN -> GAP -> linear (official ``aux_head``: BN, pool, 1x1 conv)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean((2, 3)))


# --- model -------------------------------------------------------------------------------------
class OverLoCK(TimmApi, nn.Module):
    """OverLoCK: Base-Net (stages 1-3), Overview-Net (stage 4 at stride 32) and ContMix Focus-Net.

    Args:
        in_chans, num_classes, drop_rate, global_pool: timm conventions (``global_pool=''`` returns the
            unprojected fusion map and needs ``num_classes=0``).
        depths: RepConv blocks in stages 1-4 (stage 4 is the Overview-Net).
        sub_depths: ContMix blocks at stride 16 and 32 (the second must be >= 1).
        dims: ``C0..C3``. kernel_sizes: DilatedReparam / ContMix ``K`` per stage (official 17, 15, 13, 7).
        mlp_ratio: RepConv MLP ratio; sub_mlp_ratio: ContMix MLP ratio (of ``C``).
        num_groups: ContMix kernels per pixel at stride 16 / 32 (official ``2 * sub_num_heads``).
        smk_size: small dynamic kernel; ctx_pool_size: region centres per side (official 7, issue #39).
        ls_init_value: LayerScale init per stage (None: no LayerScale).
        projection: width of the head's 1x1 projection (``head_hidden_size``).
        drop_path_rate: stochastic depth, linear over all blocks (RepConv then ContMix, as official).
        deploy: build DilatedReparam blocks folded (default; the paper's parameter counts).
        use_aux_head: build the Overview-Net's auxiliary classifier (official training form).
        feature_norms, h_proj: dense-prediction norms / the detection backbone's context projection.
        contmix_backend: ``na2d_av`` backend for every ContMix block.
        img_size: accepted for timm's API and validated; any input of at least 32x32 works.
        extra_norm: deprecated name of ``feature_norms``.
    """

    aux_loss_weight = 0.4  # official recipe (train.py): loss = CE(main) + 0.4 * CE(aux)

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 3, 2),
        sub_depths: Sequence[int] = (6, 2),
        dims: Sequence[int] = (56, 112, 256, 336),
        kernel_sizes: Sequence[int] = (17, 15, 13, 7),
        mlp_ratio: float = 4.0,
        sub_mlp_ratio: float = 3.0,
        num_groups: Sequence[int] = (8, 12),
        smk_size: int = 5,
        ctx_pool_size: int = 7,
        ls_init_value: Sequence[Optional[float]] = (None, None, 1.0, 1.0),
        projection: int = 1024,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        deploy: bool = True,
        use_aux_head: bool = False,
        feature_norms: bool = False,
        h_proj: bool = False,
        contmix_backend: str = "auto",
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        extra_norm: Optional[bool] = None,
    ):
        super().__init__()
        if extra_norm is not None:
            warnings.warn("OverLoCK: extra_norm is deprecated; use feature_norms", DeprecationWarning, stacklevel=2)
            feature_norms = extra_norm
        check_pool("OverLoCK", global_pool, MAP_POOLS, num_classes)
        if len(depths) != 4 or len(dims) != 4 or len(kernel_sizes) != 4 or len(sub_depths) != 2 or sub_depths[1] < 1:
            raise ValueError("OverLoCK: depths, dims, kernel_sizes need 4 entries and sub_depths 2 (the second >= 1)")
        if dims[3] % 4:
            raise ValueError(f"OverLoCK: dims[3]={dims[3]} must be divisible by 4 (context width C3 / 4)")
        if h_proj and not feature_norms:
            raise ValueError("OverLoCK: h_proj=True (detection backbone) needs feature_norms=True")
        if img_size is not None and min((img_size, img_size) if isinstance(img_size, int) else img_size) < 32:
            raise ValueError(f"OverLoCK needs images of at least 32x32 (stride 32), got img_size={img_size}")
        ctx_dim = dims[3] // 4
        fusion_dim = dims[3] + ctx_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = fusion_dim
        self.head_hidden_size = projection
        self.grad_checkpointing = False
        self._num_stages = 4

        self.patch_embed1 = Stem(in_chans, dims[0])
        self.patch_embed2 = _downsample(dims[0], dims[1])
        self.patch_embed3 = _downsample(dims[1], dims[2])
        self.patch_embed4 = _downsample(dims[2], dims[3])
        self.high_level_proj = nn.Conv2d(dims[3], ctx_dim, 1)
        self.patch_embedx = CtxDownsample(dims[2], dims[3])

        dpr = torch.linspace(0, drop_path_rate, sum(depths) + sum(sub_depths), device="cpu").tolist()
        for i in range(4):
            blocks = [RepConvBlock(dims[i], kernel_sizes[i], mlp_ratio, ls_init_value[i], dpr[sum(depths[:i]) + j],
                                   deploy=deploy) for j in range(depths[i])]
            setattr(self, f"blocks{i + 1}", nn.ModuleList(blocks))
        contmix = dict(ctx_dim=ctx_dim, smk_size=smk_size, mlp_ratio=sub_mlp_ratio, ctx_pool_size=ctx_pool_size,
                       deploy=deploy, backend=contmix_backend)
        off = sum(depths)
        self.sub_blocks3 = nn.ModuleList([
            ContMixBlock(dims[2], kernel_size=kernel_sizes[2], num_groups=num_groups[0], ls_init_value=ls_init_value[2],
                         drop_path=dpr[off + j], is_first=j == 0, **contmix)
            for j in range(sub_depths[0])
        ])
        off += sub_depths[0]
        self.sub_blocks4 = nn.ModuleList([
            ContMixBlock(dims[3], kernel_size=kernel_sizes[3], num_groups=num_groups[1], ls_init_value=ls_init_value[3],
                         drop_path=dpr[off + j], is_last=j == sub_depths[1] - 1, **contmix)
            for j in range(sub_depths[1])
        ])
        self.feature_info = [
            dict(num_chs=dims[0], reduction=4, module="blocks1"),
            dict(num_chs=dims[1], reduction=8, module="blocks2"),
            dict(num_chs=dims[2] + ctx_dim, reduction=16, module="sub_blocks3"),
            dict(num_chs=fusion_dim, reduction=32, module="sub_blocks4"),
        ]
        self.feature_norms = nn.ModuleList(
            [LayerNorm2d(info["num_chs"], eps=1e-6) for info in self.feature_info] + [LayerNorm2d(dims[3], eps=1e-6)]
        ) if feature_norms else None
        self.h_proj = nn.Sequential(nn.Conv2d(dims[3], fusion_dim, 1), LayerScale(fusion_dim, 1e-5)) if h_proj else None

        self.aux_head = AuxHead(dims[3], num_classes) if use_aux_head else None
        self.conv_head = nn.Conv2d(fusion_dim, projection, 1, bias=False)
        self.norm_head = nn.BatchNorm2d(projection)
        self.head_act = nn.SiLU()
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official init: conv / linear weights trunc-normal(0.02) with zero bias; norms weight 1, bias 0."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # the official recipe uses timm's default filter (no decay on 1-D tensors)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed1",
            blocks=[
                (r"^patch_embed(\d+)", (0,)) if coarse else (r"^patch_embed(\d+)", None),
                (r"^blocks(\d+)\.(\d+)", None),
                (r"^(?:high_level_proj|sub_blocks3)", (5,)),
                (r"^(?:patch_embedx|sub_blocks4)", (6,)),
                (r"^(?:feature_norms|h_proj|aux_head|conv_head|norm_head)", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """New classifier (and auxiliary classifier); ``global_pool`` defaults to ``'avg'``."""
        check_pool("OverLoCK", global_pool, MAP_POOLS, num_classes)
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        ref = self.patch_embed1[0].weight
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        if self.aux_head is not None:
            dim = self.aux_head.norm.num_features
            self.aux_head.fc = nn.Linear(dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
                else nn.Identity()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every DilatedReparam block (training form -> deploy form; in place, use in eval mode)."""
        for m in self.modules():
            if isinstance(m, DilatedReparamBlock):
                m.reparameterize()

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official OverLoCK file (classification, ``_reparam``, mmdet / mmseg) strictly."""
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn, safe_globals=_CHECKPOINT_GLOBALS)

    # --- forward ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, take: Sequence[int] = (), norm: bool = False, last: int = 3
                 ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Run stages up to ``last``; returns (final map, Overview-Net context or x, taken stage outputs)."""
        feats: List[torch.Tensor] = []
        x = run_blocks(self, self.blocks1, self.patch_embed1(x))  # (B, C0, H/4, W/4)
        if 0 in take:
            feats.append(self.feature_norms[0](x) if norm else x)
        if last < 1:
            return x, x, feats
        x = run_blocks(self, self.blocks2, self.patch_embed2(x))  # (B, C1, H/8, W/8)
        if 1 in take:
            feats.append(self.feature_norms[1](x) if norm else x)
        if last < 2:
            return x, x, feats
        x = run_blocks(self, self.blocks3, self.patch_embed3(x))  # (B, C2, H/16, W/16)
        ctx_cls = run_blocks(self, self.blocks4, self.patch_embed4(x))  # Overview-Net: (B, C3, H/32, W/32)
        ctx_ori = self.high_level_proj(ctx_cls)  # (B, Cc, H/32, W/32)
        ctx_up = F.interpolate(ctx_ori, size=x.shape[-2:], mode="bilinear", align_corners=False)
        ctx = ctx_up
        for block in self.sub_blocks3:
            x, ctx = run_block(self, block, x, ctx, ctx_up)
        if 2 in take or last < 3:
            feat = torch.cat([x, ctx], dim=1)  # (B, C2 + Cc, H/16, W/16)
            if 2 in take:
                feats.append(self.feature_norms[2](feat) if norm else feat)
            if last < 3:
                return feat, ctx_cls, feats
        x, ctx = self.patch_embedx(x, ctx)
        for block in self.sub_blocks4:
            x, ctx = run_block(self, block, x, ctx, ctx_ori)  # the last returns (cat[x, ctx], None)
        if 3 in take:
            if norm:
                feat = self.feature_norms[3](x)
                if self.h_proj is not None:
                    feat = feat + self.h_proj(self.feature_norms[4](ctx_cls))
                feats.append(feat)
            else:
                feats.append(x)
        return x, ctx_cls, feats

    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str):
        """Stage outputs at strides 4, 8, 16, 32 with channels ``[C0, C1, C2 + Cc, C3 + Cc]``; ``norm``
        applies ``feature_norms`` (and ``h_proj`` at stride 32 when built), as the official dense backbones."""
        take_indices, max_index = feature_take_indices(4, indices)
        last = min(max_index if stop_early else 3, self._num_stages - 1)
        final, _, intermediates = self._forward(x, take_indices, norm, last)
        return final, intermediates

    def _prune(self, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
        take_indices, max_index = feature_take_indices(4, indices)
        self._num_stages = max_index + 1
        if max_index < 3:
            self.patch_embedx, self.sub_blocks4 = None, nn.ModuleList()
            self.h_proj = None
        if max_index < 2:
            self.patch_embed3 = self.patch_embed4 = self.high_level_proj = None
            self.blocks3, self.blocks4, self.sub_blocks3 = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        if max_index < 1:
            self.patch_embed2, self.blocks2 = None, nn.ModuleList()
        if prune_norm:
            self.feature_norms = None
        elif self.feature_norms is not None and max_index < 3:
            self.feature_norms = self.feature_norms[:max_index + 1]
        if prune_head or max_index < 3:
            self.aux_head = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.conv_head = self.norm_head = self.head_act = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> fusion map (B, C3 + Cc, H / 32, W / 32)."""
        return self._forward(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool.pool_type:
            return x  # unpooled: the 1x1 projection belongs to the pooled head
        x = self.head_act(self.norm_head(self.conv_head(x)))  # (B, projection, h, w)
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Logits; in training with ``use_aux_head=True``, ``dict(main=logits, aux=overview_logits)``."""
        x, ctx_cls, _ = self._forward(x)
        x = self.forward_head(x)
        if self.aux_head is not None and self.training:
            return dict(main=x, aux=self.aux_head(ctx_cls))
        return x


# --- checkpoints ---------------------------------------------------------------------------------
def _safe_globals() -> Tuple[Any, ...]:
    # mmengine / mmcv training states may carry numpy scalars in their ``meta`` (e.g. hook messages).
    out: List[Any] = [argparse.Namespace]
    try:
        import numpy as np
        multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
        out += [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
        out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    except (ImportError, AttributeError):
        pass
    return tuple(out)


_CHECKPOINT_GLOBALS = _safe_globals()
_HEAD_RENAMES = {"head.0.": "conv_head.", "head.1.": "norm_head.", "aux_head.0.": "aux_head.norm.",
                 "extra_norm.": "feature_norms."}


def _bn_entries(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k: state_dict[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")}


def _fold_reparam_blocks(state_dict: Dict[str, torch.Tensor], model: OverLoCK) -> Dict[str, torch.Tensor]:
    """Fold every training-form DilatedReparam block of ``state_dict`` whose module in ``model`` is deployed."""
    for name, module in model.named_modules():
        if not isinstance(module, DilatedReparamBlock) or not module.deploy:
            continue
        p = name + "."
        if p + "origin_bn.weight" not in state_dict:
            continue
        branches = [(r, state_dict[f"{p}dil_conv_k{k}_{r}.weight"], _bn_entries(state_dict, f"{p}dil_bn_k{k}_{r}."))
                    for k, r in zip(module.kernel_sizes, module.dilates)]
        dtype = state_dict[p + "lk_origin.weight"].dtype
        weight, bias = merge_dilated_branches(state_dict[p + "lk_origin.weight"], _bn_entries(state_dict, p + "origin_bn."),
                                              branches)
        for k in [k for k in state_dict if k.startswith(p) and not k.startswith(p + "lk_origin.")]:
            del state_dict[k]
        state_dict[p + "lk_origin.weight"] = weight.to(dtype)
        state_dict[p + "lk_origin.bias"] = bias.to(dtype)
    return state_dict


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: OverLoCK) -> Dict[str, torch.Tensor]:
    """Adapt an official OverLoCK state dict to :class:`OverLoCK`.

    * Containers ``{"model"|"state_dict"|"module": ...}`` are unwrapped, ``module.`` prefixes dropped; an
      mmdet / mmseg file keeps only its ``backbone.`` entries (without the prefix).
    * Head: ``head.{0,1}`` -> ``conv_head`` / ``norm_head``, the 1x1-conv classifiers ``head.4`` and
      ``aux_head.2`` -> linear ``head`` / ``aux_head.fc``, ``aux_head.0`` -> ``aux_head.norm``.
    * Training-form DilatedReparam entries are folded when the model is deployed (the default); a
      ``_reparam`` file for a training-form model raises a ``ValueError``.
    * The official dense norms ``extra_norm`` are ``feature_norms`` (visionzoo files from before the rename too).
    * Parts only one side has: the aux head, ``feature_norms`` and ``h_proj`` are dropped when the model lacks
      them; when the file lacks them (or the head, for dense files) the model keeps its fresh init, as the
      official dense backbones do with their non-strict loads.
    visionzoo state dicts pass unchanged.
    """
    for key in ("model", "state_dict", "module"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}

    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith(("head.4.", "aux_head.2.")):
            k = ("head." if k.startswith("head.4.") else "aux_head.fc.") + k.split(".")[-1]
            v = v.flatten(1) if v.ndim == 4 else v
        for old, new in _HEAD_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    state_dict = out

    train_form = [n for n, m in model.named_modules() if isinstance(m, DilatedReparamBlock) and not m.deploy]
    if train_form and f"{train_form[0]}.lk_origin.weight" in state_dict \
            and f"{train_form[0]}.origin_bn.weight" not in state_dict:
        raise ValueError("OverLoCK: this is a reparameterised (_reparam) checkpoint; its dilated branches are folded "
                         "and cannot be loaded into a training-form model. Build the model with deploy=True.")
    state_dict = _fold_reparam_blocks(state_dict, model)

    own = model.state_dict()
    optional = ("aux_head.", "feature_norms.", "h_proj.", "conv_head.", "norm_head.", "head.")
    state_dict = {k: v for k, v in state_dict.items() if not (k.startswith(optional) and k not in own)}
    for prefix in optional:
        if not any(k.startswith(prefix) for k in state_dict):
            state_dict.update({k: v.detach().clone() for k, v in own.items() if k.startswith(prefix)})
    return state_dict


def _create_overlock(variant: str, pretrained: bool = False, **kwargs) -> OverLoCK:
    if kwargs.get("extra_norm") is not None:  # the old name of feature_norms (the constructor warns)
        kwargs.setdefault("feature_norms", kwargs["extra_norm"])
    return build_family_model(OverLoCK, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


_RELEASE = "https://github.com/LMMMEng/OverLoCK/releases/download/v1/"


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # custom_load: official files may be training states; OverLoCK.load_pretrained reads them with
    # weights_only=True, folds the dilated branches for the deploy form and loads strictly.
    return family_cfg(url, dict(
        pool_size=(7, 7), crop_pct=0.9, fixed_input_size=False, first_conv="patch_embed1.0",
        custom_load=bool(url), license="apache-2.0", paper_ids="arXiv:2502.20087",
        paper_name="OverLoCK: An Overview-first-Look-Closely-next ConvNet with Context-Mixing Dynamic Kernels",
        origin_url="https://github.com/LMMMEng/OverLoCK",
        notes=("training form: deploy=False, use_aux_head=True; aux loss weight 0.4",
               "the _reparam release files load too (overlock_*_in1k_224_reparam.pth)")), **kwargs)


default_cfgs = generate_default_cfgs({
    "overlock_xt.in1k": _cfg(_RELEASE + "overlock_xt_in1k_224.pth", crop_pct=0.925),
    "overlock_t.in1k": _cfg(_RELEASE + "overlock_t_in1k_224.pth", crop_pct=0.95),
    "overlock_s.in1k": _cfg(_RELEASE + "overlock_s_in1k_224.pth", crop_pct=0.95),
    "overlock_b.in1k": _cfg(_RELEASE + "overlock_b_in1k_224.pth", crop_pct=0.975),
    "test_overlock.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license=None),
})


@register_model
def overlock_xt(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-XT: depths (2, 2, 3, 2) + ContMix (6, 2), dims (56, 112, 256, 336), groups (8, 12)
    (recipe drop_path 0.1)."""
    model_args = dict(depths=(2, 2, 3, 2), sub_depths=(6, 2), dims=(56, 112, 256, 336), num_groups=(8, 12))
    return _create_overlock("overlock_xt", pretrained, **dict(model_args, **kwargs))


@register_model
def overlock_t(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-T: depths (4, 4, 6, 2) + ContMix (12, 2), dims (64, 128, 256, 512), groups (8, 16)
    (recipe drop_path 0.15)."""
    model_args = dict(depths=(4, 4, 6, 2), sub_depths=(12, 2), dims=(64, 128, 256, 512), num_groups=(8, 16))
    return _create_overlock("overlock_t", pretrained, **dict(model_args, **kwargs))


@register_model
def overlock_s(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-S: depths (6, 6, 8, 3) + ContMix (16, 3), dims (64, 128, 320, 512), groups (16, 32)
    (recipe drop_path 0.4)."""
    model_args = dict(depths=(6, 6, 8, 3), sub_depths=(16, 3), dims=(64, 128, 320, 512), num_groups=(16, 32))
    return _create_overlock("overlock_s", pretrained, **dict(model_args, **kwargs))


@register_model
def overlock_b(pretrained: bool = False, **kwargs) -> OverLoCK:
    """OverLoCK-B: depths (8, 8, 10, 4) + ContMix (20, 4), dims (80, 160, 384, 576), groups (12, 18)
    (recipe drop_path 0.5)."""
    model_args = dict(depths=(8, 8, 10, 4), sub_depths=(20, 4), dims=(80, 160, 384, 576), num_groups=(12, 18))
    return _create_overlock("overlock_b", pretrained, **dict(model_args, **kwargs))


@register_model
def test_overlock(pretrained: bool = False, **kwargs) -> OverLoCK:
    """A tiny OverLoCK for tests: one block per stage, K (7, 5, 7, 5), 3x3 small kernels, 64x64 inputs
    (ContMix runs its small-map resize path there)."""
    model_args = dict(depths=(1, 1, 1, 1), sub_depths=(1, 1), dims=(16, 24, 32, 48), kernel_sizes=(7, 5, 7, 5),
                      num_groups=(4, 4), smk_size=3, projection=64)
    return _create_overlock("test_overlock", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/LMMMEng/OverLoCK"
for _name, _params, _gmacs, _top1, _paper_gmacs in (
    # Deploy form without the aux head (the paper's counts); GMACs: visionzoo.utils.count_macs at 224,
    # batch 1, ContMix counted (K^2 * c MACs per pixel and group); the paper's "FLOPs" last.
    ("overlock_xt", 16_453_712, 2.6370, 82.7, 2.6),
    ("overlock_t", 33_467_040, 5.5189, 84.2, 5.5),
    ("overlock_s", 56_156_452, 9.4964, 84.8, 9.7),
    ("overlock_b", 94_942_528, 16.7813, 85.1, 16.7),
):
    register_meta(_name, ModelMeta("overlock", _params, _gmacs, _top1, _ORIGIN, "apache-2.0", "github release",
                                   _paper_gmacs))
register_meta("test_overlock", ModelMeta("overlock"))
