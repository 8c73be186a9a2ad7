"""BiFormer: vision transformers with bi-level routing attention (BRA).

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023,
arXiv 2303.08810. Official code: https://github.com/rayleizhu/BiFormer (MIT), ``models/biformer.py``,
``models/biformer_stl.py``, ``models/_common.py`` and the checkpoint-compatible ``ops/bra_legacy.py``.

The released models, reproduced exactly (weights load one to one, outputs match to 1e-4):

* Four stages; stage ``i`` has width ``dims[i]``. T/S/B: stem ``Conv3x3/2 -> BN -> GELU -> Conv3x3/2 ->
  BN``, downsamplers ``Conv3x3/2 -> BN``, and every block starts with a residual depthwise 3x3 conv
  ("conv position embedding") before ``x + Attn(LN x)`` and ``x + MLP(LN x)`` (LayerNorm eps 1e-6).
  STL (the Swin-T-layout ablation): stem ``Conv4x4/4 -> BN``, downsamplers ``BN -> Conv2x2/2``, no
  per-block conv.
* Stages 1-3 use BRA with ``dims[i] // 32`` heads; stage 4 uses plain global attention
  (``AttentionLePE``) with **8 heads whatever the width** (the official ``topk=-2`` path ignores the
  head count the model computes), **no qkv bias** and its LePE (depthwise 5x5) applied to the **block
  input** x; BRA's LePE is applied to V instead, and BRA's qkv projection has a bias.
* BRA scales both the routing logits and the token attention by ``qk_dim ** -0.5`` with the **full**
  query/key width (0.125 / 0.088 / 0.0625 at widths 64 / 128 / 256), not the head width: the models
  were trained that way and the official NCHW refactor keeps it "to be consistent with old models".
* Routing compares region means of q and k over all channels, is **detached** (no gradient) and its
  softmax weights are unused: only the top-k indices matter.
* The head is ``BatchNorm2d -> global average pool -> Linear`` (a BatchNorm, not a LayerNorm).

Any input size: BRA needs every stage-1..3 token grid to split into ``n_win x n_win`` regions.
``n_win`` defaults to ``img_size / 32`` per side (7 at 224, so a region is 8x8 / 4x4 / 2x2 tokens in
stages 1 / 2 / 3, as in the paper), so ``img_size=(h, w)`` with ``h`` and ``w`` multiples of 32 just works,
including non-square sizes (``n_win`` may differ per side, a strict generalisation of the official
square grid). ``auto_pad=True`` pads, as the official segmentation / detection backbones do: the
**normalised input of each BRA layer** is zero-padded at the bottom/right before the qkv projection, so
padded tokens carry the qkv bias, take part in the region means and are attended to; the output is
cropped. Any other size raises a ``ValueError`` naming the constraint. When a grid has fewer regions
than ``topk`` (tiny inputs), every query region attends to all regions (the official code would fail
in ``torch.topk``).

Dense prediction: ``features_only=True`` returns the four stage outputs (strides 4/8/16/32, widths
``dims``), each through the official dense backbone's extra ``LayerNorm2d`` (``extra_norms``, applied
to the outputs only, not in-stream). The dense backbones' frozen BatchNorm (``norm_eval``) is a
training-loop choice left to the task layer.

BRA itself is :func:`visionzoo.ops.routing_attention.bi_level_routing_attention`, whose ``auto``
backend never materialises the official ``topk``-fold K/V gather (``attn_backend="reference"`` runs
the official algorithm).

CPU speed (same values to rounding; benchmarks/biformer_cpu.md): the model runs channels-last from the
stem on (the blocks' ``(B, H, W, C)`` views are contiguous), and eager fp32 CPU inference without
autograd (:func:`_fused_inference`) runs the linears and the position-embedding conv as oneDNN fused ops
(bias, MLP GELU and residual adds in the epilogue), the largest MLP activations in token chunks and the
stem and large-map stages on batch chunks that stay in cache. Training, autocast, tracing and export
take the plain ops.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, LayerNorm2d, Mlp, SelectAdaptivePool2d, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._hub import download_cached_file
from timm.models._features_fx import register_notrace_module

from ..ops import aten_only_enabled, tracing
from ..ops.routing_attention import bi_level_routing_attention
from ._input import record_input_size
from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import (MAP_POOLS, TimmApi, build_family_model, check_pool, family_cfg, prune_stages, run_blocks,
                      stage_intermediates)

__all__ = ["BiFormer"]

_logger = logging.getLogger(__name__)


_ONEDNN_OPS: Optional[bool] = None  # oneDNN's fused linear and conv ops exist in this torch build (checked once)
MLP_CHUNK_ELEMENTS = 1 << 23  # fused inference: larger MLP hidden activations run in token chunks (32 MB fp32)
BATCH_CHUNK_ELEMENTS = 1 << 20  # fused inference: the stem and stages run on batch chunks of at most this size


def _in_batch_chunks(fn, x: torch.Tensor, per_image: int) -> torch.Tensor:
    """``fn(x)``, in fused inference (:func:`_fused_inference`) over chunks of the batch whose per-image
    activation (``per_image`` elements) adds up to at most ``BATCH_CHUNK_ELEMENTS``, concatenated. Each
    chunk's activations then stay in cache between the layers: measured 48 -> 23 ms for the stem and
    219 -> 156 ms for stage 1 at 448 (batch 4, one image per chunk) on the AVX-512 Xeon; stages with
    smaller maps (and 224 inputs, except the stem) run whole. Per-image math, the same values."""
    if not _fused_inference(x):  # (first: under torch.export the size test below would guard the batch)
        return fn(x)
    step = max(1, BATCH_CHUNK_ELEMENTS // max(1, per_image))
    if x.shape[0] <= step:
        return fn(x)
    return torch.cat([fn(x[i:i + step]) for i in range(0, x.shape[0], step)])


def _fused_inference(x: torch.Tensor) -> bool:
    """Whether a block may run its linears and convs as oneDNN's fused CPU ops (:func:`_linear`,
    :func:`_conv_residual`) and the model chunk its batch (:func:`_in_batch_chunks`): eager fp32 inference
    on CPU (no autograd, no autocast, not tracing or exporting, not :func:`aten_only`)."""
    global _ONEDNN_OPS
    if _ONEDNN_OPS is None:
        _ONEDNN_OPS = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                       and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
    return (_ONEDNN_OPS and not torch.is_grad_enabled() and type(x) is torch.Tensor and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and not tracing()
            and not aten_only_enabled())


def _linear(x: torch.Tensor, layer: nn.Module, fused: bool, gelu: bool = False,
            residual: Optional[torch.Tensor] = None, rows: Optional[slice] = None) -> torch.Tensor:
    """``layer(x)`` (output features ``rows`` only, if given), then exact GELU if ``gelu``, then
    ``residual +`` it if given.

    With ``fused`` (see :func:`_fused_inference`) and a plain ``nn.Linear``, one oneDNN call does it all:
    the bias, the GELU or the residual add run in the GEMM's epilogue. Besides saving a pass over the
    output, this avoids ATen's ``addmm`` path for a bias, which first broadcast-copies the bias into the
    whole output (measured 1.3-2x the GEMM's own time for BiFormer's stage-1 linears at 448 on the
    AVX-512 Xeon). Same values to rounding (the GELU is the same erf form). Other modules (e.g. a
    dynamically quantized Linear, which takes no ``rows``) are called as they are."""
    if not isinstance(layer, nn.Linear):
        assert rows is None, "output-feature slices need a plain nn.Linear"
        y = layer(x)
        y = F.gelu(y) if gelu else y
        return y if residual is None else residual + y
    weight, bias = layer.weight, layer.bias
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if fused:
        if residual is not None and not gelu:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                               "none" if gelu else "")
    else:
        y = F.linear(x, weight, bias)
        y = F.gelu(y) if gelu else y
    return y if residual is None else residual + y


def _conv_residual(x: torch.Tensor, conv: nn.Conv2d, fused: bool) -> torch.Tensor:
    """``x + conv(x)``; with ``fused`` (see :func:`_fused_inference`; ``x`` channels-last, ``conv`` zero-padded)
    one oneDNN conv with the add in its epilogue (the same values)."""
    if not fused or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return x + conv(x)
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "add", None, None, [], None)


@register_notrace_module  # input-size checks and padding are Python control flow on shapes
class BiLevelRoutingAttention(nn.Module):
    """BRA on channels-last maps (the official ``bra_legacy`` with ``qk_dim = dim``, identity KV
    downsampling, ``param_attention='qkvo'`` and no routing parameters).

    ``x`` (B, H, W, C) -> (B, H, W, C). ``qkv`` projects to ``[q | k | v]`` of widths (C, C, C); the LePE
    depthwise conv runs on V; ``proj`` is the official ``wo``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: Tuple[int, int],
        topk: int,
        side_dwconv: int = 5,
        auto_pad: bool = False,
        backend: str = "auto",
        stage: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = tuple(n_win)
        self.topk = topk
        self.scale = dim ** -0.5  # full qk width, not the head width (see the module docstring)
        self.auto_pad = auto_pad
        self.backend = backend
        self.stage = stage
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual + BRA(x)`` (just ``BRA(x)`` without ``residual``)."""
        B, H, W, C = x.shape
        n_h, n_w = self.n_win
        pad_b, pad_r = (-H) % n_h, (-W) % n_w
        fused = _fused_inference(x)
        if pad_b or pad_r:
            if not self.auto_pad:
                raise ValueError(
                    f"BiFormer: the stage-{self.stage + 1} token grid {H}x{W} does not split into "
                    f"{n_h}x{n_w} routing regions (n_win); use an input whose stage grids are multiples "
                    f"of n_win (e.g. H, W multiples of 32 * n_win), build the model with "
                    f"img_size=(H, W) so that n_win follows it, or pass auto_pad=True"
                )
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zero-pad the normalised input, as official
        # The qkv projection as two GEMMs, [q | k] and v: V comes out contiguous, so the LePE conv reads it
        # without a layout copy; q and k are channel slices of one tensor (no copies).
        C = self.dim
        if isinstance(self.qkv, nn.Linear):
            qk = _linear(x, self.qkv, fused, rows=slice(0, 2 * C))  # (B, Hp, Wp, 2C)
            v = _linear(x, self.qkv, fused, rows=slice(2 * C, 3 * C))  # (B, Hp, Wp, C)
        else:  # e.g. a dynamically quantized Linear: one call, V a channel slice
            qk, v = self.qkv(x).split([2 * C, C], dim=-1)
        del x  # (the padded copy; memory: every full-size temporary released early counts at 600x500)
        q, k = qk.split(C, dim=-1)
        if B == 0:  # an empty batch (the kernels index regions per image; there are none)
            out = torch.zeros_like(v)
        else:
            out = bi_level_routing_attention(
                q, k, v, self.num_heads, (n_h, n_w), min(self.topk, n_h * n_w), self.scale, backend=self.backend,
            )
        # LePE on V, (B, Hp, Wp, C); its NCHW permute is channels-last, so the depthwise conv runs so.
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        del q, k, v, qk
        out = out.add_(lepe) if fused else out + lepe
        if pad_b or pad_r:
            out = self.proj(out)[:, :H, :W]  # the official crop (a view: the residual add makes the copy)
            return out if residual is None else residual + out
        return _linear(out, self.proj, fused, residual=residual)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, "
                f"auto_pad={self.auto_pad}, backend={self.backend!r}")


class AttentionLePE(nn.Module):
    """Global multi-head attention of the last stage (official ``AttentionLePE``).

    8 heads by default whatever the width, no qkv bias, scale ``head_dim ** -0.5``; the LePE depthwise
    conv runs on the block input ``x`` and is added before ``proj``. ``x`` (B, H, W, C) -> (B, H, W, C).
    Written with explicit matmuls (a few dozen tokens at 224) so FLOP counters see them on any device.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **dd)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual + Attn(x)`` (just ``Attn(x)`` without ``residual``)."""
        B, H, W, C = x.shape
        N, m = H * W, self.num_heads
        fused = _fused_inference(x)
        qkv = _linear(x, self.qkv, fused)
        q, k, v = qkv.reshape(B, N, 3, m, C // m).permute(2, 0, 3, 1, 4).unbind(0)  # (B, m, N, d) each
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, m, N, N)
        out = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
        lepe = self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LePE on x, (B, H, W, C)
        return _linear(out + lepe, self.proj, fused, residual=residual)


class BiFormerBlock(nn.Module):
    """``x += DW3x3(x)`` (T/S/B only), ``x += DropPath(Attn(LN x))``, ``x += DropPath(MLP(LN x))``.

    Input and output are NCHW (B, C, H, W), the output in channels-last memory; attention and MLP run
    on the contiguous (B, H, W, C) view of it.
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        conv_pos: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd) if conv_pos else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last memory (a no-op after the first block of a stage): the depthwise conv then runs
        # channels-last and (B, H, W, C) below is a contiguous view, so the LayerNorms and residual adds
        # read contiguous memory and nothing is copied back and forth between the layouts.
        x = x.contiguous(memory_format=torch.channels_last)
        fused = _fused_inference(x)
        if self.pos_embed is not None:
            x = _conv_residual(x, self.pos_embed, fused)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C), contiguous
        if fused and not (self.training and isinstance(self.drop_path, DropPath)):
            # inference: the residual adds and the MLP's GELU run inside the linears (see :func:`_linear`)
            x = self.attn(self.norm1(x), residual=x)
            return self._mlp_inference(x).permute(0, 3, 1, 2)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)  # NCHW, channels-last memory

    def _mlp_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``x + MLP(LN x)`` for fused inference, ``x`` (B, H, W, C). When the hidden activation would exceed
        ``MLP_CHUNK_ELEMENTS`` (stage 1 at 448: 38.5 MB), in chunks of tokens with ``MLP_CHUNK_ELEMENTS // 4``
        hidden elements each: the hidden chunk stays in cache instead of a fresh, page-faulted buffer making
        a round trip through memory (measured 40 -> 25 ms per stage-1 MLP at 448, batch 4, on the Xeon)."""
        mlp = self.mlp

        def run(t: torch.Tensor) -> torch.Tensor:
            return _linear(_linear(self.norm2(t), mlp.fc1, True, gelu=True), mlp.fc2, True, residual=t)

        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] * mlp.fc1.out_features <= MLP_CHUNK_ELEMENTS:
            return run(x)
        step = max(1, MLP_CHUNK_ELEMENTS // 4 // mlp.fc1.out_features)
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], step):
            out[i:i + step] = run(flat[i:i + step])
        return out.view(x.shape)


class BiFormerStage(nn.Module):
    """Downsampler (identity for stage 1, whose downsampling is the stem) followed by the blocks."""

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        return _in_batch_chunks(lambda t: run_blocks(self, self.blocks, t), x, x.shape[1:].numel())


def _default_n_win(img_size: Tuple[int, int]) -> Tuple[int, int]:
    """One routing region per stage-4 token: ``img_size / 32`` per side (7 at 224)."""
    return tuple(max(1, round(s / 32)) for s in img_size)


class BiFormer(TimmApi, nn.Module):
    """BiFormer (T/S/B) and BiFormer-STL.

    Args:
        in_chans, num_classes, global_pool, drop_rate: timm conventions (``drop_rate`` is dropout before
            the classifier; ``global_pool=''`` returns the normalised last-stage map).
        depths, dims: blocks and width per stage.
        mlp_ratio: MLP expansion (3 for T/S/B, 4 for STL).
        head_dim: BRA head width (heads = ``dims[i] // head_dim``; official 32).
        topks: routed regions per stage; ``-2`` = global ``AttentionLePE`` (the official last stage).
        last_stage_heads: heads of ``AttentionLePE`` (official 8 for every variant).
        side_dwconv: LePE kernel size.
        layout: ``'biformer'`` (T/S/B) or ``'stl'`` (Swin-T layout ablation, see the module docstring).
        img_size: the input size ``n_win`` is derived from when ``n_win`` is not given.
        n_win: routing regions per side, ``n`` or ``(n_h, n_w)`` (official 7 for classification, 8 for
            ADE20K, 16 for COCO); default ``img_size / 32``.
        auto_pad: pad BRA inputs to multiples of ``n_win`` (the official dense backbones' option).
        feature_norms: add the dense backbones' per-stage ``LayerNorm2d`` (``extra_norms``), applied by
            ``forward_intermediates(norm=True)`` and ``features_only``.
        drop_path_rate: stochastic depth, linear over all blocks.
        attn_backend: BRA backend (``'auto'``, ``'reference'``, ``'chunked'``, ``'triton'``).
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 8, 2),
        dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratio: float = 3.0,
        head_dim: int = 32,
        topks: Sequence[int] = (1, 4, 16, -2),
        last_stage_heads: int = 8,
        side_dwconv: int = 5,
        layout: str = "biformer",
        img_size: Union[int, Tuple[int, int]] = 224,
        n_win: Optional[Union[int, Tuple[int, int]]] = None,
        auto_pad: bool = False,
        feature_norms: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_pool("BiFormer", global_pool, MAP_POOLS)
        if layout not in ("biformer", "stl"):
            raise ValueError(f"BiFormer: layout must be 'biformer' or 'stl', got {layout!r}")
        if len(depths) != 4 or len(dims) != 4 or len(topks) != 4:
            raise ValueError("BiFormer: depths, dims and topks need one entry per stage (4)")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool_type = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.img_size = to_2tuple(img_size)
        self.n_win = to_2tuple(n_win) if n_win is not None else _default_n_win(self.img_size)
        # timm's input traits: the model takes only img_size-like inputs unless BRA pads (auto_pad)
        self._traits = dict(fixed_input_size=not auto_pad)
        self.layout = layout

        if layout == "biformer":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1, **dd),
                nn.BatchNorm2d(dims[0] // 2, **dd),
                nn.GELU(),
                nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1, **dd),
                nn.BatchNorm2d(dims[0], **dd),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4, **dd), nn.BatchNorm2d(dims[0], **dd))

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i, (depth, dim, topk) in enumerate(zip(depths, dims, topks)):
            if i == 0:
                downsample = nn.Identity()
            elif layout == "biformer":
                downsample = nn.Sequential(nn.Conv2d(dims[i - 1], dim, 3, stride=2, padding=1, **dd),
                                           nn.BatchNorm2d(dim, **dd))
            else:
                downsample = nn.Sequential(nn.BatchNorm2d(dims[i - 1], **dd),
                                           nn.Conv2d(dims[i - 1], dim, 2, stride=2, **dd))
            blocks = []
            for j in range(depth):
                if topk > 0:
                    attn = BiLevelRoutingAttention(dim, dim // head_dim, self.n_win, topk, side_dwconv, auto_pad,
                                                   attn_backend, stage=i, **dd)
                elif topk == -2:
                    attn = AttentionLePE(dim, last_stage_heads, side_dwconv, **dd)
                else:
                    raise ValueError(f"BiFormer: topk must be > 0 (BRA) or -2 (global attention), got {topk}")
                blocks.append(BiFormerBlock(dim, attn, mlp_ratio, dpr[sum(depths[:i]) + j],
                                            conv_pos=layout == "biformer", **dd))
            stages.append(BiFormerStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_norms = nn.ModuleList([
            LayerNorm2d(dim, eps=1e-6, **dd) for dim in dims
        ]) if feature_norms else None

        self.norm = nn.BatchNorm2d(dims[-1], **dd)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        # conv weights stored channels-last, the layout the convs run in (else each call reorders them)
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0); convs keep
        PyTorch's default."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # the official list names parameters BiFormer does not have

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^feature_norms\.(\d+)", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            check_pool("BiFormer", global_pool, MAP_POOLS)
            self.global_pool_type = global_pool
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        ref = next(self.parameters())  # the final norm may have been pruned (features_only)
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    def set_attn_backend(self, backend: str) -> None:
        """Switch every BRA layer to ``backend`` (``'auto'``, ``'reference'``, ``'chunked'``, ``'triton'``)."""
        for m in self.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.backend = backend

    def set_input_size(self, img_size: Union[int, Tuple[int, int]], n_win: Optional[Union[int, Tuple[int, int]]] = None,
                       auto_pad: Optional[bool] = None) -> None:
        """Re-derive ``n_win`` for a new input size (BRA has no size-dependent parameters)."""
        self.img_size = to_2tuple(img_size)
        self.n_win = to_2tuple(n_win) if n_win is not None else _default_n_win(self.img_size)
        for m in self.modules():
            if isinstance(m, BiLevelRoutingAttention):
                m.n_win = self.n_win
                if auto_pad is not None:
                    m.auto_pad = auto_pad
        if auto_pad is not None:
            self._traits = dict(self._traits, fixed_input_size=not auto_pad)
        record_input_size(self, self.img_size)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official classification file (``{"model": ...}``), an official mmdet / mmseg dense
        checkpoint (``state_dict`` with ``backbone.`` keys) or a visionzoo state dict, strictly."""
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn, safe_globals=(argparse.Namespace,))

    # --- forward ----------------------------------------------------------------------------
    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str):
        """Stage outputs (B, dims[i], H / s_i, W / s_i) at strides ``s_i`` = 4, 8, 16, 32, with ``norm``
        through their dense-prediction LayerNorm2d (``feature_norms``)."""
        x, intermediates = stage_intermediates(self, self._stem, x, indices, norm, stop_early)
        return self.norm(x), intermediates

    def _prune(self, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
        take_indices, max_index, pruned_end = prune_stages(self, indices, prune_norm)
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem on the image in channels-last memory: every conv of the model then runs channels-last
        (the stem's first conv on a 3-channel NCHW image measured 7x slower on the AVX-512 Xeon), and the
        blocks' (B, H, W, C) views are contiguous from the first block on."""
        conv = self.stem[0]  # its output is the stem's largest activation
        per_image = conv.out_channels * (x.shape[-2] // conv.stride[0]) * (x.shape[-1] // conv.stride[1])
        return _in_batch_chunks(self.stem, x.contiguous(memory_format=torch.channels_last), per_image)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> BatchNorm-ed last-stage map (B, dims[-1], H / 32, W / 32)."""
        return self.norm(self.stages(self._stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)  # (B, C), or the map itself with global_pool=''
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- checkpoints ------------------------------------------------------------------------------
def _rename_official(k: str, mlp_fc2: str) -> str:
    """One official key -> visionzoo (see :func:`checkpoint_filter_fn`)."""
    p = k.split(".")
    if p[0] == "downsample_layers":
        i = int(p[1])
        return ".".join(["stem"] + p[2:]) if i == 0 else ".".join(["stages", str(i), "downsample"] + p[2:])
    if p[0] == "extra_norms":
        return ".".join(["feature_norms"] + p[1:])
    if p[0] == "stages":
        rest = p[3:] if p[2] == "blocks" else p[2:]  # STL: stages.{s}.blocks.{b}; T/S/B: stages.{s}.{b}
        b, rest = rest[0], rest[1:]
        if rest[:2] == ["attn", "qkv"] and len(rest) > 2 and rest[2] == "qkv":
            rest = ["attn", "qkv"] + rest[3:]  # BRA's QKVLinear wrapper
        elif rest[:2] == ["attn", "wo"]:
            rest = ["attn", "proj"] + rest[2:]
        elif rest[:2] == ["mlp", "0"]:
            rest = ["mlp", "fc1"] + rest[2:]
        elif rest[:2] == ["mlp", mlp_fc2]:
            rest = ["mlp", "fc2"] + rest[2:]
        return ".".join(["stages", p[1], "blocks", b] + rest)
    return k


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: BiFormer) -> Dict[str, torch.Tensor]:
    """Adapt an official BiFormer state dict (classification or dense) to :class:`BiFormer`.

    * Containers: ``{"model": ...}`` (classification files), ``{"state_dict": ...}`` (mmdet / mmseg); a
      ``module.`` prefix is removed. Dense checkpoints keep only the ``backbone.`` keys, unprefixed.
    * ``downsample_layers.0`` -> ``stem``, ``downsample_layers.{i}`` -> ``stages.{i}.downsample``,
      ``stages.{s}.{b}`` (STL: ``stages.{s}.blocks.{b}``) -> ``stages.{s}.blocks.{b}``,
      ``attn.qkv.qkv`` -> ``attn.qkv``, ``attn.wo`` -> ``attn.proj``, ``mlp.0`` / ``mlp.3`` (STL ``mlp.2``)
      -> ``mlp.fc1`` / ``mlp.fc2``, ``extra_norms`` -> ``feature_norms``.
    * Dense extra norms are dropped when the model has none; when the model has them and the file does
      not (a classification checkpoint), they keep the model's fresh init, which is what the official
      dense backbone gets from its non-strict load. A dense file has no ``norm``/``head``: the model's
      own (fresh) ones are kept, with a log line.
    visionzoo state dicts pass unchanged.
    """
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}

    if any(k.startswith("downsample_layers.") for k in state_dict):
        mlp_fc2 = "2" if model.layout == "stl" else "3"
        state_dict = {_rename_official(k, mlp_fc2): v for k, v in state_dict.items()}

    own = model.state_dict()
    if model.feature_norms is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("feature_norms.")}
    elif not any(k.startswith("feature_norms.") for k in state_dict):
        state_dict.update({k: v.detach().clone() for k, v in own.items() if k.startswith("feature_norms.")})
    missing_head = [k for k in own if (k.startswith("norm.") or k.startswith("head.")) and k not in state_dict]
    if missing_head and any(k.startswith("stages.") for k in state_dict):
        _logger.info("BiFormer: the checkpoint has no classification norm/head (a dense backbone); "
                     "keeping the model's freshly initialised %s", ", ".join(sorted({k.split('.')[0] for k in missing_head})))
        state_dict.update({k: own[k].detach().clone() for k in missing_head})
    return state_dict


def _cache_under_official_name(variant: str, kwargs: Dict[str, Any]) -> None:
    """Download an official file under the name the official code gives it, then load it as a file.

    The OneDrive links all end in ``/root/content``, and timm names a cached download after the URL's
    last path part, so every variant would share ``<torch hub>/checkpoints/content`` (and load another
    variant's weights). The official loader saves them as ``<variant>_in1k.pth``
    (``load_state_dict_from_url(file_name=...)``); timm's ``download_cached_file`` takes that name too.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if overlay.get("file") or overlay.get("state_dict"):
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    if cfg.file or not (cfg.url or "").endswith("/root/content"):
        return
    path = download_cached_file((cfg.url, f"{variant}_{cfg.tag}.pth"), check_hash=False, cache_dir=kwargs.get("cache_dir"))
    kwargs["pretrained_cfg_overlay"] = dict(overlay, file=path)


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    if pretrained:
        _cache_under_official_name(variant, kwargs)
    return build_family_model(BiFormer, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    # custom_load: official files are training states ({"model": ...}); BiFormer.load_pretrained
    # reads them with weights_only=True and loads strictly.
    return family_cfg(url, dict(
        pool_size=(7, 7), crop_pct=0.875, first_conv="stem.0", custom_load=bool(url),
        fixed_input_size=True,  # built for one size (img_size); see set_input_size / dynamic_img_size
        license="mit", paper_ids="arXiv:2303.08810", origin_url="https://github.com/rayleizhu/BiFormer",
        paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention"), **kwargs)


def _onedrive(share_id: str) -> str:
    # The official links (models/biformer.py); reported dead / malformed in rayleizhu/BiFormer#53.
    return f"https://api.onedrive.com/v1.0/shares/{share_id}/root/content"


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(_onedrive("s!AkBbczdRlZvChHEOoGkgwgQzEDlM")),
    "biformer_small.in1k": _cfg(_onedrive("s!AkBbczdRlZvChHDyM-x9KWRBZ832")),
    "biformer_base.in1k": _cfg(_onedrive("s!AkBbczdRlZvChHI_XPhoadjaNxtO")),
    "biformer_stl.in1k": _cfg(_onedrive("s!AkBbczdRlZvChSf-m7ujkvx9lIQ1")),
    "test_biformer.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license=None),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: depths (2, 2, 8, 2), dims (64, 128, 256, 512), MLP 3, top-k (1, 4, 16, global)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512), mlp_ratio=3)
    return _create_biformer("biformer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: depths (4, 4, 18, 4), dims (64, 128, 256, 512), MLP 3 (recipe drop_path 0.15)."""
    model_args = dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512), mlp_ratio=3)
    return _create_biformer("biformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: depths (4, 4, 18, 4), dims (96, 192, 384, 768), MLP 3; stage 4 still has 8 heads."""
    model_args = dict(depths=(4, 4, 18, 4), dims=(96, 192, 384, 768), mlp_ratio=3)
    return _create_biformer("biformer_base", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL: BRA in the Swin-T layout, depths (2, 2, 6, 2), dims (96, 192, 384, 768), MLP 4."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), mlp_ratio=4, layout="stl")
    return _create_biformer("biformer_stl", pretrained, **dict(model_args, **kwargs))


@register_model
def test_biformer(pretrained: bool = False, **kwargs) -> BiFormer:
    """A tiny BiFormer for tests: dims (16, 32, 64, 128), head dim 8, top-k (1, 2, 4, global), 64x64
    inputs (n_win 2), same code paths."""
    model_args = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), mlp_ratio=3, head_dim=8, topks=(1, 2, 4, -2),
                      img_size=64)
    return _create_biformer("test_biformer", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/rayleizhu/BiFormer"
_WEIGHTS = "onedrive (official links)"
for _name, _params, _gmacs, _top1, _paper_gmacs in (
    # GMACs: visionzoo.utils.count_macs (torch FlopCounter, BRA through its FLOP formula), 224x224, batch 1;
    # the paper's "FLOPs" (Table 1) last.
    ("biformer_tiny", 13_142_760, 2.2159, 81.4, 2.2),
    ("biformer_small", 25_536_232, 4.4636, 83.8, 4.5),
    ("biformer_base", 56_804_968, 9.7590, 84.3, 9.8),
    ("biformer_stl", 28_372_552, 4.5739, 82.7, 4.6),
):
    register_meta(_name, ModelMeta("biformer", _params, _gmacs, _top1, _ORIGIN, "mit", _WEIGHTS, _paper_gmacs))
register_meta("test_biformer", ModelMeta("biformer"))
