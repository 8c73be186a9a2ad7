"""Vision Mamba (Vim): bidirectional state-space blocks with a middle class token.

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
Model", Zhu et al., ICML 2024, arXiv 2401.09417.
Official code: https://github.com/hustvl/Vim (Apache-2.0; the weights' model cards say
non-commercial while their metadata says apache-2.0 — check before commercial use).

This is the released "v2, middle class token, divide-by-2" model family:

* Each block is ``x + DropPath(Mixer(RMSNorm(x)))`` on an fp32 residual stream. The official code
  writes the same thing with a fused add+RMSNorm that carries ``residual`` between layers, which
  shifts its drop-path list by one (layer ``i`` drops the output of layer ``i-1``); written as a
  plain pre-norm block, mixer ``i`` is dropped with rate ``linspace(0, rate, depth)[i]``, which is
  exactly the official behaviour.
* The mixer runs a Mamba selective scan in both directions over the token sequence. The input and
  output projections are shared; the depthwise causal conv1d, ``x_proj``, ``dt_proj``, ``A`` and
  ``D`` are per direction (``*_b`` for the backward one). The two outputs are averaged
  (``(y + flip(y_b)) / 2``), the fix for NaN losses under AMP (hustvl/Vim#30, PR #90).
* The mixer between its projections is one op entry, :func:`visionzoo.ops.selective_scan.bimamba_inner`,
  which chooses itself (a fused C path for CPU inference, also under CPU autocast; the differentiable
  ops otherwise). Both directions go through one conv call and one scan call there: the backward direction is the
  time-reversed sequence stacked as extra channels, and B/C use the grouped (G=2) layout. The scan is
  :func:`visionzoo.ops.selective_scan.selective_scan_bidirectional` (``reversed_inputs=True``): it
  gates the backward half with the shared ``z`` read time-reversed and averages ``y`` with ``flip(y_b)``
  itself (with the Triton backend inside the kernel's indexing, no flipped copies of ``z`` or ``y_b``). Tensors
  stay time-major (``(B, L, C)`` in memory, as the Linear layers produce them) from ``in_proj`` to
  ``out_proj``; the conv and the scan read ``(B, C, L)`` views. The official slow path
  (no fused kernel, or ``inference_params`` set) silently drops the backward direction; this
  implementation has a single path, so that cannot happen.
* The class token is inserted at index ``M // 2`` of the ``M`` patch tokens and the position
  embedding (``M + 1`` rows) is added after the insertion. Resizing the position embedding takes
  the class row out, resamples the grid and puts the row back in the middle (the official
  ``interpolate_pos_embed`` treats row 0 as the class token; hustvl/Vim#108).
* ``final_pool_type='mean'`` in the official names is dead config: the class token is pooled.

The kernels are :func:`visionzoo.ops.selective_scan.selective_scan` (mamba-ssm's CUDA kernel when
importable on a GPU, an exact blocked PyTorch scan otherwise) and
:func:`visionzoo.ops.causal_conv1d.causal_conv1d_bidirectional` (the causal-conv1d package on a GPU,
a C kernel that reads the sequence backwards in place on CPU, shifted multiply-adds otherwise).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ..layers import PatchEmbed, plain_feature_indices, resample_pos_embed_with_inner_token
from ..ops import tracing
from ..ops.rms_norm import rms_norm
from ..ops.selective_scan import (MambaBranch, MixerDirection, VimBlockWeights, bimamba_inner, plain_linear,
                                  vim_blocks_cpu, vim_blocks_cpu_applies)
from ._input import record_input_size
from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import TOKEN_POOLS, TimmApi, build_family_model, check_pool, family_cfg, run_block

__all__ = ["VisionMamba"]


@register_notrace_function
def insert_cls_and_pos_embed(
    x: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    base_grid: Tuple[int, int],
) -> torch.Tensor:
    """(B, H, W, D) patch tokens -> (B, H*W + 1, D) with the class token at index H*W // 2.

    A public name on purpose: torch.fx only autowraps global functions whose names lack a leading "_".

    ``pos_embed`` (1, base_h * base_w + 1, D) is resampled when the grid differs from ``base_grid``.
    """
    B, H, W, D = x.shape
    x = x.reshape(B, H * W, D)
    if (H, W) != tuple(base_grid):
        pos_embed = resample_pos_embed_with_inner_token(pos_embed, (H, W), base_grid)
    mid = (H * W) // 2
    x = torch.cat([x[:, :mid], cls_token.expand(B, -1, -1), x[:, mid:]], dim=1)
    return x + pos_embed


@register_notrace_module  # an FX leaf: its forward picks the C kernel or the aten op at run time
class RMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32 (Mamba's ``RMSNorm``; eps 1e-5).

    Returns the dtype of the weight, so an fp32 residual stream feeds half-precision layers in a
    ``.half()`` model while autocast keeps handling mixed precision as usual.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``out_dtype`` (default: the weight's): the result cast to it, in the kernel where it can."""
        dtype = out_dtype or self.weight.dtype
        return rms_norm(x.float(), self.weight.float(), self.eps, out_dtype=None if dtype == torch.float32 else dtype)


@register_notrace_module
class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer (``bimamba_type="v2"``, ``if_divide_out=True``).

    Parameter names follow the official module so checkpoints map one to one.

    Shapes: x (B, L, D) -> (B, L, D); E = expand * D inner channels, N = d_state, R = dt_rank.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.scan_backend = scan_backend
        E, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(dim, 2 * E, bias=False, **dd)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1,
                                                         bias=conv_bias, **dd))
            self.add_module("x_proj" + suffix, nn.Linear(E, R + 2 * N, bias=False, **dd))
            self.add_module("dt_proj" + suffix, nn.Linear(R, E, bias=True, **dd))
        # A and D stay fp32 whatever the module dtype (the scan accumulates in fp32).
        self.A_log = nn.Parameter(torch.empty(E, N, device=device, dtype=torch.float32))
        self.A_b_log = nn.Parameter(torch.empty(E, N, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, device=device, dtype=torch.float32))
        self.D_b = nn.Parameter(torch.empty(E, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(E, dim, bias=False, **dd)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's S4D-real init: A = -(1..N), D = 1, dt_proj bias = softplus^-1(log-uniform dt)."""
        dt_min, dt_max, floor = self._dt_init
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        for suffix in ("", "_b"):
            getattr(self, f"A{suffix}_log").copy_(torch.log(A).expand(self.d_inner, -1))
            getattr(self, f"D{suffix}").fill_(1.0)
            dt_proj = getattr(self, "dt_proj" + suffix)
            bound = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -bound, bound)
            u = torch.rand(self.d_inner, device=dt_proj.bias.device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _project(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)``; under CPU autocast in inference mode with the weight cast once per weight version.

        PyTorch's autocast caches its cast of a weight under ``no_grad`` but not under ``inference_mode``,
        where every call re-cast the in/out projections' weights (two thirds of a Vim-Ti block's casts; bf16
        was slower than fp32 on two threads because of it). Same dtypes and values as autocast's cast.
        """
        if not (torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
                and torch.is_inference_mode_enabled() and x.device.type == "cpu" and type(linear) is nn.Linear
                and linear.weight.dtype == torch.float32 and not tracing()):
            return linear(x)
        dtype, w = torch.get_autocast_dtype("cpu"), linear.weight
        key = (w.data_ptr(), w._version, dtype)
        cached = linear.__dict__.get("_vz_cast")
        if cached is None or cached[0] != key:
            cached = linear.__dict__["_vz_cast"] = (key, w.to(dtype))
        return F.linear(x.to(dtype), cached[1], None if linear.bias is None else linear.bias.to(dtype))

    def branches(self) -> Tuple[MambaBranch, MambaBranch]:
        """The forward and backward directions' modules."""
        return (MambaBranch(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
                MambaBranch(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Between the projections, one op entry that chooses itself: the fused C path for CPU inference
        # (in place, dt_proj folded into the scans), the differentiable conv and scan ops otherwise.
        y = bimamba_inner(self._project(self.in_proj, x), *self.branches(), backend=self.scan_backend)
        return self._project(self.out_proj, y)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook would see any of ``modules`` called (their own hooks, or global ones)."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


class VimBlock(nn.Module):
    """``x + DropPath(Mixer(RMSNorm(x)))`` on the (fp32) residual stream x (B, L, D)."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = RMSNorm(dim, eps=norm_eps, **dd)
        self.mixer = BiMambaMixer(dim, **(mixer_kwargs or {}), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def fused_weights(self) -> Optional[VimBlockWeights]:
        """This block's weights for one C call (:func:`vim_blocks_cpu`, with :func:`vim_blocks_cpu_applies` for the
        input), or None where its modules do not allow one: it takes plain fp32 ``nn.Linear`` layers and norm, no
        stochastic depth in training mode, and no forward hooks on the modules the call does not enter."""
        # Read from the modules' own dicts (``Module.__getattr__`` is Python; the model asks every block at every
        # forward, with its code cold in the caches after the previous call).
        if self.training and type(self.drop_path) is not nn.Identity:
            return None
        norm, m = self._modules["norm"], self._modules["mixer"]
        mods, params = m._modules, m._parameters
        lin = [mods[k] for k in ("in_proj", "out_proj", "x_proj", "dt_proj", "x_proj_b", "dt_proj_b")]
        w = [plain_linear(x) and x._parameters["weight"] for x in lin]
        norm_w = norm._parameters["weight"]
        convs = mods["conv1d"], mods["conv1d_b"]
        if (not all(x is not False and x.dtype == torch.float32 for x in w) or norm_w.dtype != torch.float32
                or not all(type(c) is nn.Conv1d for c in convs) or _hooked(norm, m, *lin[:2])):
            return None
        conv, conv_b = convs[0]._parameters, convs[1]._parameters
        return VimBlockWeights(
            norm_w, norm.eps, w[0], w[1],
            MixerDirection(conv["weight"], conv["bias"], w[2], w[3], lin[3]._parameters["bias"], params["A_log"],
                           params["D"]),
            MixerDirection(conv_b["weight"], conv_b["bias"], w[4], w[5], lin[5]._parameters["bias"],
                           params["A_b_log"], params["D_b"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x's type first: FX's Proxy is not a Tensor (and the op's check returns False under other tracers first)
        if type(x) is torch.Tensor and vim_blocks_cpu_applies(x, self.mixer.scan_backend):
            weights = self.fused_weights()
            if weights is not None:
                return vim_blocks_cpu(x, [weights], self)
        # Under CPU autocast the mixer's in-projection casts its input to the autocast dtype: the norm writes it
        # in that dtype (the same values, one cast op less per layer; see benchmarks/threads_cpu.md, bf16).
        cast = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") and x.device.type == "cpu"
                else None)  # autocast first: FX's symbolic tracing cannot branch on x.device
        return x + self.drop_path(self.mixer(self.norm(x, cast)))


class VisionMamba(TimmApi, nn.Module):
    """Vision Mamba (v2, middle class token, outputs divided by 2).

    Args:
        img_size: input size the position embedding is laid out for.
        patch_size / stride: patch-embedding kernel and step (stride 8 gives the "†" models).
        in_chans, num_classes, global_pool: timm conventions; ``global_pool`` is ``'token'`` (the
            middle class token, official), ``'avg'`` (mean of patch tokens) or ``''``.
        embed_dim, depth: D and number of blocks.
        d_state, d_conv, expand, dt_rank: Mamba mixer sizes (N, conv width, E / D, R).
        drop_rate: dropout before the classifier; pos_drop_rate: after the position embedding.
        drop_path_rate: stochastic depth, linear in depth.
        residual_in_fp32: keep the residual stream in fp32 (official: True).
        dynamic_img_size: accept any image size the patches tile, resampling pos_embed on the fly.
        scan_backend: selective-scan backend (``"auto"``, ``"chunked"``, ``"reference"``, ``"mamba"``).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        norm_eps: float = 1e-5,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        residual_in_fp32: bool = True,
        dynamic_img_size: bool = False,
        scan_backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_pool("Vim", global_pool, TOKEN_POOLS)
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.residual_in_fp32 = residual_in_fp32
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim,
                                      dynamic_img_size=dynamic_img_size, model_name="Vim", **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        mixer_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                            scan_backend=scan_backend)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linspace(0, rate, depth)
        self.blocks = nn.Sequential(*[
            VimBlock(embed_dim, drop_path=dpr[i], norm_eps=norm_eps, mixer_kwargs=mixer_kwargs, **dd)
            for i in range(depth)
        ])
        self.norm = RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        reduction = self.patch_embed.stride[0]
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.init_weights()

    # --- init -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The official init: patch conv lecun-normal, head / pos / cls trunc-normal(0.02), Linear
        biases zero (dt_proj bias keeps its softplus^-1 init), out_proj kaiming-uniform / sqrt(depth)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        depth = len(self.blocks)
        for block in self.blocks:
            out_proj = block.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight.div_(math.sqrt(depth))

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = {"pos_embed", "cls_token"}
        for i in range(len(self.blocks)):
            names.update(f"blocks.{i}.mixer.{p}" for p in ("A_log", "A_b_log", "D", "D_b"))
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            check_pool("Vim", global_pool, TOKEN_POOLS)
            self.global_pool = global_pool
        device, dtype = self.cls_token.device, self.cls_token.dtype
        self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[int] = None) -> None:
        """Change the native input size, resampling ``pos_embed`` around the middle class token."""
        if patch_size is not None:
            raise ValueError("Vim: changing patch_size is not supported")
        if img_size is None:
            return
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        with torch.no_grad():
            pos = resample_pos_embed_with_inner_token(self.pos_embed.data, self.patch_embed.grid_size, old_grid)
        self.pos_embed = nn.Parameter(pos)
        record_input_size(self, self.patch_embed.img_size)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load an official Vim training checkpoint (or a visionzoo one) strictly.

        Official files hold ``model`` and ``model_ema``; ``model`` is used unless the pretrained tag
        ends in ``_ema``. They also pickle the training ``argparse.Namespace``, the only class
        allowed beyond plain tensors and containers.
        """
        tag = (getattr(self, "pretrained_cfg", None) or {}).get("tag") or ""
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn,
                               safe_globals=(argparse.Namespace,), use_ema=tag.endswith("_ema"))

    # --- forward ----------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.patch_embed(x)  # (B, H, W, D)
        H, W = x.shape[1], x.shape[2]
        x = insert_cls_and_pos_embed(x, self.cls_token, self.pos_embed, self.patch_embed.grid_size)
        x = self.pos_drop(x)
        if self.residual_in_fp32:
            x = x.float()
        return x, H, W  # x: (B, H*W + 1, D)

    output_fmts = ("NCHW", "NLC")

    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str,
                       return_prefix_tokens: bool = False):
        """Block outputs (the residual stream after each chosen block, stride ``stride``), through the final
        RMSNorm with ``norm``: ``'NCHW'`` (B, D, H, W) maps or ``'NLC'`` (B, H*W, D) tokens, the class token
        removed either way; ``return_prefix_tokens`` pairs each with its class token (B, D)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, H, W = self._embed(x)
        B, mid = x.shape[0], (H * W) // 2
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates, prefix = [], []
        for i, block in enumerate(blocks):
            x = run_block(self, block, x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix.append(y[:, mid])
                spatial = torch.cat([y[:, :mid], y[:, mid + 1:]], dim=1)  # (B, H*W, D)
                if output_fmt == "NCHW":
                    spatial = spatial.reshape(B, H, W, spatial.shape[-1]).permute(0, 3, 1, 2).contiguous()
                intermediates.append(spatial)
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return self.norm(x), intermediates

    def _prune(self, indices: Union[int, List[int]], prune_norm: bool, prune_head: bool) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, H'*W' + 1, D), class token at index H'*W' // 2."""
        x, _, _ = self._embed(x)
        layers = self._fused_layers(x)
        if layers is not None:
            x = vim_blocks_cpu(x, layers, self)
        else:
            for block in self.blocks:
                x = run_block(self, block, x)
        return self.norm(x)

    def _fused_layers(self, x: torch.Tensor) -> Optional[List[VimBlockWeights]]:
        """The blocks' weights where all may run as one C call: each could alone (:meth:`VimBlock.fused_weights`),
        with one scan backend, and none has a forward hook (blocks are not called); else None."""
        blocks = self.blocks
        if not (len(blocks) and type(x) is torch.Tensor and vim_blocks_cpu_applies(x, blocks[0].mixer.scan_backend)):
            return None
        backend = blocks[0].mixer.scan_backend
        if _hooked(*blocks) or any(b.mixer.scan_backend != backend for b in blocks):
            return None
        layers = [b.fused_weights() for b in blocks]
        return None if None in layers else layers

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, (x.shape[1] - 1) // 2]
        elif self.global_pool == "avg":
            mid = (x.shape[1] - 1) // 2
            x = torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionMamba) -> Dict[str, torch.Tensor]:
    """Adapt an official Vim state dict (or a whole official training file) to :class:`VisionMamba`.

    ``layers.{i}`` -> ``blocks.{i}``, ``norm_f`` -> ``norm``; the position embedding is resampled
    around the middle class token when the grid differs. visionzoo state dicts pass unchanged.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith("layers."):
            k = "blocks." + k[len("layers."):]
        elif k.startswith("norm_f."):
            k = "norm." + k[len("norm_f."):]
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            num_old = v.shape[1] - 1
            side = math.isqrt(num_old)
            if side * side != num_old:
                raise ValueError(f"Vim: cannot infer the grid of a pos_embed with {num_old} patch rows")
            v = resample_pos_embed_with_inner_token(v, model.patch_embed.grid_size, (side, side))
        out[k] = v
    return out


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    # Default features: the blocks the official segmentation backbone taps ([5, 11, 17, 23] at depth 24).
    out_indices = plain_feature_indices(kwargs.get("depth", 24))
    return build_family_model(VisionMamba, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return family_cfg(url, dict(
        pool_size=None, crop_pct=0.875, license="apache-2.0", paper_ids="arXiv:2401.09417",
        fixed_input_size=True,  # built for one size (img_size); see set_input_size / dynamic_img_size
        paper_name="Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
        origin_url="https://github.com/hustvl/Vim"), **kwargs)


def _hf(repo: str, filename: str, **kwargs) -> Dict[str, Any]:
    # custom_load: official files are whole training states with a pickled argparse.Namespace;
    # VisionMamba.load_pretrained reads them with that single class allow-listed.
    return _cfg(hf_hub_id=repo, hf_hub_filename=filename, custom_load="hf", **kwargs)


_TINY = ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")
_TINY_FT = ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth")
_SMALL = ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")
_SMALL_FT = ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth")
_BASE = ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth")  # file name unverified

default_cfgs = generate_default_cfgs({
    "vim_tiny.in1k": _hf(*_TINY),
    "vim_tiny.in1k_ema": _hf(*_TINY),
    "vim_tiny_stride8.in1k": _hf(*_TINY_FT),
    "vim_tiny_stride8.in1k_ema": _hf(*_TINY_FT),
    "vim_small.in1k": _hf(*_SMALL),
    "vim_small.in1k_ema": _hf(*_SMALL),
    "vim_small_stride8.in1k": _hf(*_SMALL_FT),
    "vim_small_stride8.in1k_ema": _hf(*_SMALL_FT),
    "vim_base.in1k": _hf(*_BASE),
    "vim_base.in1k_ema": _hf(*_BASE),
    "test_vim.untrained": _cfg(input_size=(3, 64, 64), license=None),
})


@register_model
def vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti (D=192, 24 blocks, patch 16 / stride 16)."""
    model_args = dict(embed_dim=192, depth=24)
    return _create_vim("vim_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_tiny_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti† (patch 16 / stride 8, 729 tokens; the finer-granularity fine-tune)."""
    model_args = dict(embed_dim=192, depth=24, stride=8)
    return _create_vim("vim_tiny_stride8", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S (D=384, 24 blocks)."""
    model_args = dict(embed_dim=384, depth=24)
    return _create_vim("vim_small", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S† (patch 16 / stride 8)."""
    model_args = dict(embed_dim=384, depth=24, stride=8)
    return _create_vim("vim_small_stride8", pretrained, **dict(model_args, **kwargs))


@register_model
def vim_base(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B (D=768, 24 blocks)."""
    model_args = dict(embed_dim=768, depth=24)
    return _create_vim("vim_base", pretrained, **dict(model_args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """A tiny Vim for tests: D=32, 3 blocks, 64x64 inputs, same code paths."""
    model_args = dict(img_size=64, embed_dim=32, depth=3, d_state=4)
    return _create_vim("test_vim", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/hustvl/Vim"
for _name, _params, _gmacs, _top1, _weights in (
    ("vim_tiny", 7_148_008, 1.558, 76.1, "hf:hustvl/Vim-tiny-midclstok"),
    ("vim_tiny_stride8", 7_250_344, 5.772, 78.3, "hf:hustvl/Vim-tiny-midclstok"),
    ("vim_small", 25_796_584, 5.381, 80.3, "hf:hustvl/Vim-small-midclstok"),
    ("vim_small_stride8", 26_001_256, 19.941, 81.4, "hf:hustvl/Vim-small-midclstok"),
    ("vim_base", 97_598_440, 19.826, 81.9, "hf:hustvl/Vim-base-midclstok"),
):
    register_meta(_name, ModelMeta("vim", _params, _gmacs, _top1, _ORIGIN, "apache-2.0", _weights))
register_meta("test_vim", ModelMeta("vim"))
