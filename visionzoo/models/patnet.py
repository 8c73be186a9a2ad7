"""PATNet: partial convolution meets visual attention (PAT_ch, PAT_sp, PAT_sf blocks).

Paper: "Partial Convolution Meets Visual Attention", Huang et al., arXiv 2503.03148.
Official code: https://github.com/haiduo/PartialNet (MIT). There is no PATNet repository: PATNet is
the PartialNet code with ``auto_div=False`` (no DPConv), which is how every released
``cfg/PartialNet_*.yaml`` is set. The code was read for its semantics; this is a re-implementation.

Macro layout (FasterNet's): a 4x4/4 conv stem + BN, four stages at ``embed_dim * [1, 2, 4, 8]``
joined by 2x2/2 conv + BN merges, and a head ``GAP -> 1x1 conv (-> 1280, no bias) -> act -> Linear``
with no norm. In every block a quarter of the channels (``n_div=4``) get a dense 3x3 "partial"
convolution and the other three quarters get attention:

* PAT_ch (stages 1-3): ``x2 = BN(SRM(x2))`` and the block is ``x + DropPath(MLP(mixer(x)))`` -- there
  is **no residual around the mixer** (FasterNet's block shape). SRM takes each channel's spatial
  mean and **unbiased** standard deviation (``Tensor.std`` defaults), mixes them with a **full**
  ``C' x C'`` conv of kernel (1, 2) (not a depthwise one as in the SRM paper), then BN and a
  hard-sigmoid gate. Because that BN sees one value per image and channel, training needs a batch
  of at least 2 per device (as in the official code).
* PAT_sf (last stage): ``x2 = Attention(LayerNorm2d(x2))`` with iRPE key biases and the block is
  ``x = x + mixer(x); x = x + DropPath(MLP(x))``. It has **4 heads** because every released cfg sets
  the flag named ``patnet_t0`` (6 otherwise), no qkv bias, and attention / projection dropout hard-wired
  to 0.1 (exposed here as ``num_heads``, ``attn_drop``, ``proj_drop`` with those defaults).
* PAT_sp (``pat_sp=True``) appends a spatial gate to the MLP: the first half of the channels is
  ``BN(x1 * hardsigmoid(conv1x1_{->1}(x1)))``, the second half ``conv1x1(BN(x2))``. Only the T1 cfg
  turns it on; the detection backbones also have it on (the class default in the official code).

iRPE (Wu et al., ICCV 2021) is used in its "bias / euc / ratio 20 / keys / per head" form: the rounded
Euclidean distance between two tokens is bucketed (exact up to ``alpha=20``, log-spaced up to
``beta=40``) and each head adds a learned scalar per bucket to its attention logits. The table has
``2 * beta + 1 = 81`` entries per head, but Euclidean distances are never negative, so only entries
40..80 are ever used (the official layout is kept so checkpoints load). The bucket index of an
``H x W`` grid is computed once per size and device and cached on the module (the official code
keeps only the last size per layer); it is plain Python state, so it does not show up in the
``state_dict`` and construction on the meta device needs nothing.

``reparameterize()`` (or ``timm.utils.model.reparameterize_model``) folds, for inference: the stem,
merge and MLP BatchNorms into the convolutions before them; SRM's BN into its (1, 2) conv; PAT_ch's
trailing BN (after the gate) into the first MLP conv, which is the only consumer of the mixer output;
and PAT_sp's second-half ``BN -> 1x1 conv`` into the last MLP conv. What is left are the gated BN of
PAT_sp, the LayerNorm of PAT_sf and the optional dense-prediction norms.

Dense prediction: ``features_only=True`` gives strides 4/8/16/32 through ``forward_intermediates``
and, like the official ``fork_feat=True`` backbones, a BN per output (``feature_norms``, official
``norm0/2/4/6``). The official detection configs build FasterNet-width backbones; they are
registered as ``patnet_det_s/m/l`` (the official configs ask for ``partialnet_s`` while the registry
names are ``PartialNet_s``, so they cannot build as shipped). Any input of at least 32x32 works;
sizes that are not multiples of 32 are floored by the strided convs, as in the official model.

Head API: ``global_pool=''`` returns the unpooled last-stage map (the 1x1 pre-logits conv follows the
pool in the official head, so it belongs to the pooled path) and therefore needs ``num_classes=0``;
``reset_classifier(n)`` restores ``'avg'`` pooling, as timm's CNNs with a conv head do.

Checkpoints: no official weights exist. ``checkpoint_filter_fn`` reads the official layout
(``stages.{0..6}``, ``avgpool_pre_head.1``, ``norm{0,2,4,6}``) from the ``.pth`` files the official
``train_test.py --pl_ckpt_2_torch_pth`` writes and from the Lightning ``.ckpt`` files themselves.
Only ``patnet_*`` / ``test_patnet`` names are registered: the official package's import-time
re-registration of timm's ``convnext_tiny`` is not reproduced, and nothing here touches timm's models.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features_fx import register_notrace_module

from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import (MAP_POOLS, TimmApi, build_family_model, check_pool, family_cfg, prune_stages, run_blocks,
                      stage_intermediates)

__all__ = ["PATNet"]


# --- BatchNorm folding ------------------------------------------------------------------------
def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = x * scale + shift`` per channel (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale, shift


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased copy of ``conv`` holding ``weight`` / ``bias`` (cast back to the conv's dtype)."""
    ref = conv.weight
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=ref.device, dtype=ref.dtype)
    new.weight.copy_(weight.to(ref.dtype))
    new.bias.copy_(bias.to(ref.dtype))
    return new


@torch.no_grad()
def _fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one biased convolution."""
    scale, shift = _bn_affine(bn)
    weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return _conv_like(conv, weight, bias)


@torch.no_grad()
def _fold_affine_before(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor, start: int) -> nn.Conv2d:
    """``conv1x1(cat(x[:, :start], x[:, start:] * scale + shift))`` as one biased 1x1 convolution."""
    weight = conv.weight.double().clone()  # (O, I, 1, 1)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    if conv.bias is not None:
        bias += conv.bias.double()
    bias += weight[:, start:, 0, 0] @ shift
    weight[:, start:] *= scale.reshape(1, -1, 1, 1)
    return _conv_like(conv, weight, bias)


# --- iRPE ---------------------------------------------------------------------------------------
@torch.no_grad()
def irpe_euclidean_buckets(height: int, width: int, alpha: float = 20, beta: float = 40,
                           gamma: float = 160) -> torch.Tensor:
    """iRPE bucket of every (query, key) pair of a row-major ``height x width`` grid (CPU, long, (N*N,)).

    The rounded Euclidean distance ``d`` is kept as is up to ``alpha``; beyond it,
    ``round(alpha + ln(d / alpha) / ln(gamma / alpha) * (beta - alpha))`` clipped to ``beta``
    (iRPE's piecewise index, evaluated in float32 in the same order as the official code).
    Buckets are offset by ``int(beta)`` so that they index a table of ``2 * int(beta) + 1``.
    """
    rows = torch.arange(height, device="cpu").repeat_interleave(width)  # (N,)
    cols = torch.arange(width, device="cpu").repeat(height)  # (N,)
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    dist = (dr * dr + dc * dc).float().sqrt().round()  # (N, N) float32, >= 0
    far = alpha + torch.log(dist / alpha) / math.log(gamma / alpha) * (beta - alpha)
    bucket = torch.where(dist <= alpha, dist, far.round().clip(max=beta))
    return (bucket.long() + int(beta)).flatten()


@register_notrace_module  # dict lookups keyed by the grid size
class IRPEBias(nn.Module):
    """iRPE on keys, ``bias`` mode: one learned scalar per head and distance bucket.

    ``forward(height, width)`` returns the additive logit bias (1, heads, N, N), N = height * width.
    The bucket index is cached per (height, width, device); at most ``cache_size`` sizes are kept.
    """

    cache_size = 8

    def __init__(self, num_heads: int, ratio: float = 20, device=None, dtype=None):
        super().__init__()
        self.alpha, self.beta, self.gamma = 1 * ratio, 2 * ratio, 8 * ratio
        self.num_buckets = 2 * int(self.beta) + 1
        self.lookup_table_bias = nn.Parameter(torch.zeros(num_heads, self.num_buckets, device=device, dtype=dtype))
        self._index_cache: "OrderedDict[Tuple[int, int, torch.device], torch.Tensor]" = OrderedDict()

    def bucket_index(self, height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """The cached (height * width) ** 2 bucket index for this grid on ``device``."""
        device = self.lookup_table_bias.device if device is None else torch.device(device)
        key = (int(height), int(width), device)
        index = self._index_cache.get(key)
        if index is None:
            index = irpe_euclidean_buckets(key[0], key[1], self.alpha, self.beta, self.gamma).to(device)
            while len(self._index_cache) >= self.cache_size:
                self._index_cache.popitem(last=False)
            self._index_cache[key] = index
        return index

    def forward(self, height: int, width: int) -> torch.Tensor:
        n = height * width
        index = self.bucket_index(height, width)
        return self.lookup_table_bias.index_select(1, index).reshape(1, -1, n, n)

    def extra_repr(self) -> str:
        return f"heads={self.lookup_table_bias.shape[0]}, buckets={self.num_buckets}, alpha={self.alpha}"


class RPEAttention(nn.Module):
    """Multi-head self-attention over an (B, C, H, W) map with iRPE key biases (PAT_sf's attention).

    ``softmax(q k^T / sqrt(d) + bias) v`` through SDPA; attention dropout is applied to the
    probabilities in training, as the official ``attn_drop`` does.
    """

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = False, attn_drop: float = 0.1,
                 proj_drop: float = 0.1, rpe_ratio: float = 20, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PATNet: attention width {dim} is not divisible by num_heads={num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe_k = IRPEBias(num_heads, rpe_ratio, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d) each
        bias = self.rpe_k(H, W).to(q.dtype)  # (1, heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B, heads, N, d)
        # An explicit copy: SDPA's output strides differ between its kernels and its decomposition, and a
        # reshape traced as a view of the kernel's layout fails when an exporter decomposes SDPA.
        x = self.proj_drop(self.proj(x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, N, C)))
        return x.transpose(1, 2).reshape(B, C, H, W)


# --- PAT blocks -------------------------------------------------------------------------------
class SRM(nn.Module):
    """Style-based recalibration, PAT_ch's channel attention. x (B, C, H, W) -> x * gate (B, C, 1, 1).

    gate = hardsigmoid(BN(conv_(1,2)([mean, std]))), with the spatial mean and unbiased std of each
    channel stacked as a (B, C, 1, 2) map and a full C x C (1, 2) convolution mixing them.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.cfc1 = nn.Conv2d(dim, dim, kernel_size=(1, 2), bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(dim, device=device, dtype=dtype)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two-pass mean / unbiased std: the same numbers as Tensor.std, ~8x faster than
        # torch.std_mean's Welford kernel on a CPU.
        flat = x.flatten(2)  # (B, C, H*W)
        mean = flat.mean(-1, keepdim=True)  # (B, C, 1)
        std = ((flat - mean).square().sum(-1, keepdim=True) / (flat.shape[-1] - 1)).sqrt()
        z = self.cfc1(torch.stack([mean, std], dim=-1))  # (B, C, 1, 2) -> (B, C, 1, 1)
        return x * self.gate(self.bn(z))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.cfc1 = _fold_bn_after(self.cfc1, self.bn)
            self.bn = nn.Identity()


class PartialChannelMixer(nn.Module):
    """PAT_ch: 3x3 conv on the first ``C // n_div`` channels, ``BN(SRM(x2))`` on the rest."""

    def __init__(self, dim: int, n_div: int = 4, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim_conv = dim // n_div
        self.dim_attn = dim - self.dim_conv
        self.partial_conv3 = nn.Conv2d(self.dim_conv, self.dim_conv, 3, 1, 1, bias=False, **dd)
        self.attn = SRM(self.dim_attn, **dd)
        self.norm = nn.BatchNorm2d(self.dim_attn, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_attn], dim=1)
        return torch.cat([self.partial_conv3(x1), self.norm(self.attn(x2))], dim=1)


class PartialSelfAttnMixer(nn.Module):
    """PAT_sf: 3x3 conv on the first ``C // n_div`` channels, ``Attention(LayerNorm2d(x2))`` on the rest."""

    def __init__(self, dim: int, n_div: int = 4, num_heads: int = 4, attn_drop: float = 0.1,
                 proj_drop: float = 0.1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim_conv = dim // n_div
        self.dim_attn = dim - self.dim_conv
        self.partial_conv3 = nn.Conv2d(self.dim_conv, self.dim_conv, 3, 1, 1, bias=False, **dd)
        self.norm = LayerNorm2d(self.dim_attn, eps=1e-6, **dd)
        self.attn = RPEAttention(self.dim_attn, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_attn], dim=1)
        return torch.cat([self.partial_conv3(x1), self.attn(self.norm(x2))], dim=1)


class PartialSpatialAttn(nn.Module):
    """PAT_sp, the MLP's last layer when enabled (official ``partial_spatial_attn_layer_reverse``).

    x (B, C, H, W): the first ``C - C // 2`` channels become ``BN(x1 * hardsigmoid(conv1x1_{->1}(x1)))``,
    the last ``C // 2`` become ``conv1x1(BN(x2))``. After the block's ``reparameterize()`` the second
    half is folded into the MLP's last conv and passes through unchanged.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim_conv = dim // 2
        self.dim_gate = dim - self.dim_conv
        self.conv = nn.Conv2d(self.dim_conv, self.dim_conv, 1, bias=False, **dd)
        self.conv_attn = nn.Conv2d(self.dim_gate, 1, 1, bias=False, **dd)
        self.norm = nn.BatchNorm2d(self.dim_gate, **dd)
        self.norm2 = nn.BatchNorm2d(self.dim_conv, **dd)
        self.act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_gate, self.dim_conv], dim=1)
        x1 = self.norm(x1 * self.act(self.conv_attn(x1)))  # (B, 1, H, W) gate broadcast over channels
        return torch.cat([x1, self.conv(self.norm2(x2))], dim=1)


class PatnetBlock(nn.Module):
    """One PATNet block; ``mixer`` is ``'channel'`` (PAT_ch, stages 1-3) or ``'self'`` (PAT_sf).

    MLP: 1x1 (C -> mlp_ratio * C) -> BN -> act -> 1x1 (-> C), no biases, [+ PAT_sp] (keys ``mlp.0/1/3/4``).
    """

    def __init__(
        self,
        dim: int,
        mixer: str = "channel",
        n_div: int = 4,
        mlp_ratio: float = 2.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        pat_sp: bool = False,
        drop_path: float = 0.0,
        num_heads: int = 4,
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if mixer == "channel":
            self.spatial_mixing = PartialChannelMixer(dim, n_div, **dd)
        elif mixer == "self":
            self.spatial_mixing = PartialSelfAttnMixer(dim, n_div, num_heads, attn_drop, proj_drop, **dd)
        else:
            raise ValueError(f"PATNet: mixer must be 'channel' or 'self', got {mixer!r}")
        self.mixer_residual = mixer == "self"
        hidden = int(dim * mlp_ratio)
        layers: List[nn.Module] = [
            nn.Conv2d(dim, hidden, 1, bias=False, **dd),
            nn.BatchNorm2d(hidden, **dd),
            act_layer(),
            nn.Conv2d(hidden, dim, 1, bias=False, **dd),
        ]
        if pat_sp:
            layers.append(PartialSpatialAttn(dim, **dd))
        self.mlp = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer_residual:
            x = x + self.spatial_mixing(x)
            return x + self.drop_path(self.mlp(x))
        return x + self.drop_path(self.mlp(self.spatial_mixing(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the mixer's trailing BN, the MLP's BN and PAT_sp's ``BN -> 1x1`` half into the MLP convs."""
        mixer = self.spatial_mixing
        if isinstance(mixer, PartialChannelMixer) and isinstance(mixer.norm, nn.BatchNorm2d):
            scale, shift = _bn_affine(mixer.norm)
            self.mlp[0] = _fold_affine_before(self.mlp[0], scale, shift, start=mixer.dim_conv)
            mixer.norm = nn.Identity()
        if isinstance(self.mlp[1], nn.BatchNorm2d):
            self.mlp[0] = _fold_bn_after(self.mlp[0], self.mlp[1])
            self.mlp[1] = nn.Identity()
        sp = self.mlp[4] if len(self.mlp) > 4 else None
        if isinstance(sp, PartialSpatialAttn) and isinstance(sp.norm2, nn.BatchNorm2d):
            fc2, g = self.mlp[3], sp.dim_gate
            scale, shift = _bn_affine(sp.norm2)
            w2 = fc2.weight.double()[:, :, 0, 0]  # (C, hidden)
            b2 = fc2.bias.double() if fc2.bias is not None else w2.new_zeros(w2.shape[0])
            wc = sp.conv.weight.double()[:, :, 0, 0]  # (C // 2, C // 2)
            w2 = torch.cat([w2[:g], wc @ (scale[:, None] * w2[g:])])
            b2 = torch.cat([b2[:g], wc @ (scale * b2[g:] + shift)])
            self.mlp[3] = _conv_like(fc2, w2[:, :, None, None], b2)
            sp.norm2 = nn.Identity()
            sp.conv = nn.Identity()


# --- stem, merges, stages ------------------------------------------------------------------------
@register_notrace_module  # validates the input size with Python control flow
class PatchEmbed(nn.Module):
    """``patch_size`` x ``patch_size`` conv with the same stride (no bias) + BN; checks the input."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4, min_size: int = 32,
                 device=None, dtype=None):
        super().__init__()
        self.in_chans = in_chans
        self.min_size = min_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=False, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"PATNet expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"PATNet: model built for {self.in_chans} input channels, got {x.shape[1]}")
        if x.shape[2] < self.min_size or x.shape[3] < self.min_size:
            raise ValueError(
                f"PATNet needs images of at least {self.min_size}x{self.min_size} (every stride-2 merge must "
                f"leave a map, and SRM's unbiased std needs 2+ pixels), got {x.shape[2]}x{x.shape[3]}"
            )
        return self.norm(self.proj(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.proj = _fold_bn_after(self.proj, self.norm)
            self.norm = nn.Identity()


class PatchMerging(nn.Module):
    """``merge_size`` x ``merge_size`` conv with the same stride (C -> 2C, no bias) + BN."""

    def __init__(self, dim: int, merge_size: int = 2, device=None, dtype=None):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, merge_size, merge_size, bias=False, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(2 * dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.reduction = _fold_bn_after(self.reduction, self.norm)
            self.norm = nn.Identity()


class PatnetStage(nn.Module):
    """Optional merge (``downsample``, official ``stages.{2i-1}``) + blocks (official ``stages.{2i}``)."""

    def __init__(self, dim: int, depth: int, downsample: bool, merge_size: int = 2,
                 drop_path: Optional[List[float]] = None, device=None, dtype=None, **block_kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        drop_path = drop_path or [0.0] * depth
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim // 2, merge_size, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            PatnetBlock(dim, drop_path=drop_path[i], **block_kwargs, **dd) for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, self.blocks, self.downsample(x))


def _act_layer(act_layer: Union[str, Callable[[], nn.Module]]) -> Callable[[], nn.Module]:
    if not isinstance(act_layer, str):
        return act_layer
    name = act_layer.lower()
    if name == "gelu":
        return nn.GELU  # exact (erf) GELU, as nn.GELU in the official code
    if name == "relu":
        return partial(nn.ReLU, inplace=True)
    raise ValueError(f"PATNet: act_layer must be 'gelu', 'relu' or a module class, got {act_layer!r}")


class PATNet(TimmApi, nn.Module):
    """PATNet (PartialNet with ``auto_div=False``), a four-stage partial-attention network.

    Args:
        in_chans, num_classes, drop_rate: timm conventions (``drop_rate`` is dropout before the classifier).
        global_pool: ``'avg'`` (official), ``'max'``, ``'avgmax'`` or ``''``. ``''`` returns the unpooled
            last-stage map and needs ``num_classes=0``: the 1x1 pre-logits conv belongs to the pooled head.
        embed_dim, depths: width of stage 1 (doubling per stage) and blocks per stage.
        mlp_ratio, n_div: MLP expansion; ``1 / n_div`` of the channels gets the 3x3 partial conv.
        patch_size, merge_size: stem and merge kernel = stride.
        feature_dim: width of the 1x1 pre-logits conv (``head_hidden_size``).
        act_layer: ``'gelu'`` (T0/T1), ``'relu'`` (others) or a module class.
        pat_sp: append PAT_sp to every MLP (official: T1 and the detection backbones).
        num_heads, attn_drop, proj_drop: PAT_sf attention (official hard-coded 4 / 0.1 / 0.1).
        drop_path_rate: stochastic depth, linear over all blocks (released recipes: see the entrypoints).
        feature_norms: add a BN after each stage for dense prediction (official ``fork_feat``
            ``norm0/2/4/6``); applied by ``forward_intermediates(norm=True)`` and ``features_only``.
        img_size: expected input size; validated and used to pre-compute the iRPE bucket index of its
            last-stage grid. Any other size of at least 32x32 still works.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Tuple[int, ...] = (1, 2, 8, 2),
        mlp_ratio: float = 2.0,
        n_div: int = 4,
        patch_size: int = 4,
        merge_size: int = 2,
        feature_dim: int = 1280,
        act_layer: Union[str, Callable[[], nn.Module]] = "gelu",
        pat_sp: bool = False,
        num_heads: int = 4,
        attn_drop: float = 0.1,
        proj_drop: float = 0.1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        feature_norms: bool = False,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_pool("PATNet", global_pool, MAP_POOLS, num_classes)  # pools keeping the 1x1 head conv's width
        dd = dict(device=device, dtype=dtype)
        act = _act_layer(act_layer)
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = int(embed_dim * 2 ** (num_stages - 1))
        self.head_hidden_size = feature_dim
        min_size = patch_size * merge_size ** (num_stages - 1)

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, min_size=min_size, **dd)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2 ** i)
            stages.append(PatnetStage(
                dim, depth, downsample=i > 0, merge_size=merge_size,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                mixer="channel" if i <= 2 else "self",  # official: channel_type 'se' for stages 0-2
                n_div=n_div, mlp_ratio=mlp_ratio, act_layer=act, pat_sp=pat_sp,
                num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop, **dd,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * merge_size ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_norms = nn.ModuleList([
            nn.BatchNorm2d(info["num_chs"], **dd) for info in self.feature_info
        ]) if feature_norms else None

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = nn.Conv2d(self.num_features, feature_dim, 1, bias=False, **dd)
        self.head_act = act()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(feature_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if img_size is not None:
            self._prepare_size(to_2tuple(img_size))

    def _prepare_size(self, img_size: Tuple[int, int]) -> None:
        min_size = self.patch_embed.min_size
        if min(img_size) < min_size:
            raise ValueError(f"PATNet needs images of at least {min_size}x{min_size}, got img_size={img_size}")
        h, w = img_size[0] // min_size, img_size[1] // min_size
        for m in self.modules():
            if isinstance(m, IRPEBias):
                m.bucket_index(h, w)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official ``cls_init_weights``: conv / linear weights trunc-normal(0.02), biases zero."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # the official recipe decays everything but 1-D tensors (timm's default filter)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^feature_norms\.(\d+)", (99998,)),
                (r"^conv_head", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """New classifier (``global_pool`` defaults to ``'avg'``, as in timm's CNNs with a conv head)."""
        check_pool("PATNet", global_pool, MAP_POOLS, num_classes)
        self.num_classes = num_classes
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        ref = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold BatchNorms into convolutions for inference (in place; use in eval mode)."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official PartialNet/PATNet file (or a visionzoo one) strictly.

        Official files are either the ``.pth`` that ``train_test.py --pl_ckpt_2_torch_pth`` writes (a
        bare ``model.state_dict()``, the layout of every released FasterNet/PartialNet file) or the
        PyTorch Lightning ``.ckpt`` itself (``state_dict`` with a ``model.`` prefix and the hyper-
        parameters as Lightning's ``AttributeDict``, which is read without importing Lightning).
        """
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn, safe_globals=_CHECKPOINT_GLOBALS)

    # --- forward ----------------------------------------------------------------------------
    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str):
        """Stage outputs (B, C_i, H / s_i, W / s_i) at strides ``s_i`` = 4, 8, 16, 32, with ``norm``
        through their dense-prediction BN (``feature_norms``)."""
        return stage_intermediates(self, self.patch_embed, x, indices, norm, stop_early)

    def _prune(self, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
        take_indices, max_index, pruned_end = prune_stages(self, indices, prune_norm)
        if pruned_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.conv_head = nn.Identity()
            self.head_act = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> last-stage map (B, 8 * embed_dim, H // 32, W // 32)."""
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool.pool_type:
            return x  # unpooled: the pre-logits conv and the classifier belong to the pooled head
        x = self.global_pool(x)  # (B, C, 1, 1)
        x = self.head_act(self.conv_head(x)).flatten(1)  # (B, feature_dim)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- checkpoints ------------------------------------------------------------------------------
# Lightning pickles its hyper-parameters as ``AttributeDict``, a dict subclass with attribute access;
# reading it as a plain dict needs no Lightning install and keeps ``torch.load(weights_only=True)``.
_CHECKPOINT_GLOBALS = (
    argparse.Namespace,
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
)


def _is_official_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    for k in state_dict:
        if k.startswith("avgpool_pre_head.") or k.split(".")[0] in ("norm0", "norm2", "norm4", "norm6"):
            return True
        parts = k.split(".")
        if len(parts) > 2 and parts[0] == "stages" and parts[2] == "reduction":
            return True
    return False


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: PATNet) -> Dict[str, torch.Tensor]:
    """Adapt an official PartialNet/PATNet state dict (or a whole Lightning checkpoint) to :class:`PATNet`.

    * Lightning ``.ckpt``: the ``state_dict`` entry, keeping the ``model.`` keys (a distillation
      teacher under ``criterion.`` is dropped); ``module.`` prefixes are removed.
    * ``stages.{2i}.`` -> ``stages.{i}.blocks.`` (the official BasicStage already names its blocks
      ``blocks``), ``stages.{2i-1}.`` -> ``stages.{i}.downsample.``, ``avgpool_pre_head.1.`` ->
      ``conv_head.``, ``norm{2i}.`` -> ``feature_norms.{i}.``.
    * Dense norms: dropped when the model has none; when the model has them and the file does not
      (a classification checkpoint), they keep the model's fresh BN init, which is what the official
      detector gets from its non-strict load.
    visionzoo state dicts pass unchanged.
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if any(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}

    if _is_official_layout(state_dict):
        out = {}
        for k, v in state_dict.items():
            parts = k.split(".")
            if parts[0] == "stages":
                idx = int(parts[1])
                # BasicStage entries already name their blocks ``blocks``: stages.{2i}.blocks.*
                prefix = f"stages.{idx // 2}" if idx % 2 == 0 else f"stages.{(idx + 1) // 2}.downsample"
                k = ".".join([prefix] + parts[2:])
            elif k.startswith("avgpool_pre_head.1."):
                k = "conv_head." + k[len("avgpool_pre_head.1."):]
            elif parts[0] in ("norm0", "norm2", "norm4", "norm6"):
                k = ".".join(["feature_norms", str(int(parts[0][4:]) // 2)] + parts[1:])
            out[k] = v
        state_dict = out

    if model.feature_norms is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("feature_norms.")}
    elif not any(k.startswith("feature_norms.") for k in state_dict):
        for k, v in model.state_dict().items():
            if k.startswith("feature_norms."):
                state_dict[k] = v.detach().clone()
    return state_dict


def _create_patnet(variant: str, pretrained: bool = False, **kwargs) -> PATNet:
    return build_family_model(PATNet, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # No official weights exist; a local file (pretrained_cfg_overlay=dict(file=...)) goes
    # through PATNet.load_pretrained, which reads official .pth and Lightning .ckpt files.
    return family_cfg(url, dict(
        pool_size=(7, 7), crop_pct=0.9, fixed_input_size=False, license="mit", paper_ids="arXiv:2503.03148",
        paper_name="Partial Convolution Meets Visual Attention", origin_url="https://github.com/haiduo/PartialNet"), **kwargs)


default_cfgs = generate_default_cfgs({
    "patnet_t0": _cfg(),
    "patnet_t1": _cfg(),
    "patnet_t2": _cfg(),
    "patnet_s": _cfg(),
    "patnet_m": _cfg(),
    "patnet_l": _cfg(),
    "patnet_det_s": _cfg(),
    "patnet_det_m": _cfg(),
    "patnet_det_l": _cfg(),
    "test_patnet": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license=None),
})


@register_model
def patnet_t0(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-T0: embed 32, depths (1, 2, 8, 2), GELU, PAT_sp off (released drop_path 0.0)."""
    model_args = dict(embed_dim=32, depths=(1, 2, 8, 2), act_layer="gelu", pat_sp=False)
    return _create_patnet("patnet_t0", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_t1(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-T1: embed 48, depths (1, 2, 8, 2), GELU, PAT_sp **on** (released drop_path 0.02)."""
    model_args = dict(embed_dim=48, depths=(1, 2, 8, 2), act_layer="gelu", pat_sp=True)
    return _create_patnet("patnet_t1", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_t2(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-T2: embed 64, depths (2, 2, 6, 4), ReLU, PAT_sp off (released drop_path 0.05)."""
    model_args = dict(embed_dim=64, depths=(2, 2, 6, 4), act_layer="relu", pat_sp=False)
    return _create_patnet("patnet_t2", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_s(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-S: embed 96, depths (2, 2, 9, 4), ReLU, PAT_sp off (released drop_path 0.1)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 9, 4), act_layer="relu", pat_sp=False)
    return _create_patnet("patnet_s", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_m(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-M: embed 128, depths (2, 3, 16, 4), ReLU, PAT_sp off (released drop_path 0.2)."""
    model_args = dict(embed_dim=128, depths=(2, 3, 16, 4), act_layer="relu", pat_sp=False)
    return _create_patnet("patnet_m", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_l(pretrained: bool = False, **kwargs) -> PATNet:
    """PATNet-L: embed 160, depths (2, 3, 20, 4), ReLU, PAT_sp off (released drop_path 0.3)."""
    model_args = dict(embed_dim=160, depths=(2, 3, 20, 4), act_layer="relu", pat_sp=False)
    return _create_patnet("patnet_l", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_det_s(pretrained: bool = False, **kwargs) -> PATNet:
    """Detection backbone S (FasterNet-S widths): embed 128, depths (1, 2, 13, 2), ReLU, PAT_sp on
    (official Mask R-CNN config: drop_path 0.15)."""
    model_args = dict(embed_dim=128, depths=(1, 2, 13, 2), act_layer="relu", pat_sp=True)
    return _create_patnet("patnet_det_s", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_det_m(pretrained: bool = False, **kwargs) -> PATNet:
    """Detection backbone M (FasterNet-M widths): embed 144, depths (3, 4, 18, 3), ReLU, PAT_sp on
    (official Mask R-CNN config: drop_path 0.2)."""
    model_args = dict(embed_dim=144, depths=(3, 4, 18, 3), act_layer="relu", pat_sp=True)
    return _create_patnet("patnet_det_m", pretrained, **dict(model_args, **kwargs))


@register_model
def patnet_det_l(pretrained: bool = False, **kwargs) -> PATNet:
    """Detection backbone L (FasterNet-L widths): embed 192, depths (3, 4, 18, 3), ReLU, PAT_sp on
    (official Mask R-CNN config: drop_path 0.3)."""
    model_args = dict(embed_dim=192, depths=(3, 4, 18, 3), act_layer="relu", pat_sp=True)
    return _create_patnet("patnet_det_l", pretrained, **dict(model_args, **kwargs))


@register_model
def test_patnet(pretrained: bool = False, **kwargs) -> PATNet:
    """A tiny PATNet for tests: embed 16, one block per stage, PAT_sp on, 64x64 inputs, same code paths."""
    model_args = dict(embed_dim=16, depths=(1, 1, 1, 1), feature_dim=64, act_layer="gelu", pat_sp=True)
    return _create_patnet("test_patnet", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/haiduo/PartialNet"
for _name, _params, _gmacs in (
    # GMACs: visionzoo.utils.count_macs (torch FlopCounter) at 224x224, batch 1.
    ("patnet_t0", 3_486_160, 0.2326),
    ("patnet_t1", 6_144_552, 0.5403),
    ("patnet_t2", 12_269_816, 1.0326),
    ("patnet_s", 28_013_304, 2.7046),
    ("patnet_m", 59_179_000, 6.6728),
    ("patnet_l", 100_641_336, 11.8815),
    # Detection widths with a 1000-class head (no official classification count exists).
    ("patnet_det_s", 41_362_992, 5.0246),
    ("patnet_det_m", 72_311_052, 9.6379),
    ("patnet_det_l", 126_831_636, 17.1163),
):
    register_meta(_name, ModelMeta("patnet", _params, _gmacs, None, _ORIGIN, "mit", None))
register_meta("test_patnet", ModelMeta("patnet"))
