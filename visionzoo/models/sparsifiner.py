"""Sparsifiner: ViTs with a learned, instance-dependent sparse attention connectivity.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
Wei et al., CVPR 2023, arXiv 2303.13755.
Official code: https://github.com/lim142857/Sparsifiner (MIT), ``src/models/sparsifiner.py`` (DeiT base)
and ``src/models/sparsifiner_lvvit.py`` (LV-ViT base); no checkpoints were released.

Every block adds a connectivity predictor (the official ``MaskPredictor``; its parameter names are
kept) to a plain ViT block. From the block's real per-head ``q``, ``k`` ``(B, H, N, d)``:

1. channel reduction ``q' = proj_c_q(q)``, ``k' = proj_c_k(k)`` (``d -> c = d / 2``, shared by heads);
2. low-rank token projection ``k'^T @ proj_n`` (``proj_n`` is ``(N, K)``, ``K = N // 6``) and
   ``cheap = (q' @ k'^T proj_n) * num_heads ** -0.5`` — the scale is the **head count**, not the head
   width, as in the official code;
3. ``coef = softmax_K(cheap)`` for every query but the class token; only its ``8`` largest entries are
   kept (chosen on ``cheap``, see below); the basis is ``|proj_back_n|^T`` with entries ``<= 0.02`` set to zero;
4. ``approx = coef @ basis`` ``(B, H, N - 1, N)``, and every query row keeps the keys of its
   ``ceil(0.25 * N)`` largest scores. The class-token row stays dense. The mask carries no gradient.

The block's attention is then exactly the official ``masked_fill(-inf) -> softmax -> nan_to_num -> @ v``
restricted to those keys, computed by :func:`visionzoo.ops.sparse_attention.sparse_attention`: the
official dense-then-mask algorithm is its ``reference`` backend, and the default backend is a fused
masked SDPA that never materialises the score matrix on CPU, the ``triton`` kernel on CUDA (see that
package for the trade-offs).

``attn_backend="reference"`` runs the official computation end to end, predictor included. With every
other backend, CPU inference computes step 4 from the kept coefficients only
(:meth:`MaskPredictor.approx_attention_kept_coef`: an ``embedding_bag`` of 8 basis rows per query, summed
in the dense product's order, so the scores and kept keys are the official ones) instead of the dense
``(B, H, N - 1, K) @ (K, N)`` product over a mostly-zero coefficient tensor; with a C compiler, one C
pass per query row computes those scores and selects the keys
(:func:`visionzoo.ops.sparse_attention.sparsifiner_keys`). CUDA, and FLOP counting on
the meta device (``count_macs``), run the official dense product.

Differences from the official code, all deliberate:

* **Selections with one rule in every runtime.** The ``8`` coefficients are the largest *logits* ``cheap``
  (the softmax is increasing: the official keys in exact arithmetic), and every top-k (coefficients, keys,
  pruned tokens) keeps the lowest indices where values tie exactly at the cut
  (:func:`visionzoo.ops.sparse_attention.top_indices`, the rule of ONNX ``TopK``). The official
  ``coef.topk`` runs on the fp32 softmax, which rounds neighbouring coefficients of near-uniform rows
  (random init) to the same value about once per thousand rows, and ``torch.topk`` then keeps the higher
  index: eager and onnxruntime chose different keys. Only such fp32 ties separate this model from the
  official one: logits equal to 1e-6 in the parity tests (depth 2); at depth 12 with random init a flipped
  tie moves them by up to 7e-4 of max |logit| (before this rule: up to 4e-4, the same kind of near-tie
  flipped by the masked SDPA's rounding; benchmarks/export_cpu.md, Sparsifiner section).

* **Any input size.** The official model fixes ``N = 197`` (``proj_n`` and ``proj_back_n`` have one row
  per token). Here their token rows are resampled like a position embedding (class row kept, grid
  rows bicubic) when the grid differs from the one they were built for; ``K`` (the number of basis
  vectors) stays. ``proj_n`` sums over tokens, so its grid rows are also scaled by
  ``old_tokens / new_tokens`` to keep the magnitude of ``k'^T proj_n``; ``proj_back_n`` is read per token
  and is not scaled. The key budget follows the token count, ``ceil(keep_rate * N)``.
* **Token sparsity removes tokens.** With ``token_pruning_loc`` set (the paper's attention + token
  sparsity; the released config has it off), the official model zeroes and masks pruned tokens but
  still computes them. Here they are dropped: at pruning location ``j`` the
  ``ceil(token_keep_rate ** (j + 1) * (N - 1))`` patch tokens with the largest head-mean class-token
  attention are kept (official rule), in their original order, and later predictors use the
  ``proj_n`` / ``proj_back_n`` rows of the tokens that remain. The key budget stays
  ``min(ceil(keep_rate * N_full), tokens left)`` as in the official code. The only numerical
  difference: in the official code a pruned token still enters the class-token softmax with a
  zero score (its key is zeroed, not masked); here it is gone. ``forward_intermediates`` scatters the
  remaining tokens back into a zero map, which is what the official model holds.
* The unused ``attn_drop`` of the official DeiT attention is not created; the LV-ViT variant's rate
  is 0 in the recipe.

Training. The losses live in :mod:`visionzoo.losses.sparsifiner`. By default (``attn_self_distill_weight
= 0.002``, the released config's value) a training-mode forward attaches the official attention
self-distillation term to every block (the predictor's approximation regressed on the block's own
dense map, detached), so a plain ``loss.backward()`` gives every parameter a gradient: the predictors
keep adapting while the backbone fine-tunes, and DDP needs no ``find_unused_parameters``. Eval-mode
outputs are unaffected. ``attn_self_distill_weight=0`` is the official phase-2 setting (the predictors
get no gradient: freeze them, e.g. ``requires_grad_(False)`` on ``*mask_predictor*``, before wrapping in
DDP). The released two-phase recipe is :class:`~visionzoo.losses.SparsifinerDistillLoss`: 1)
``attn_recon``: only the predictors train; attention runs dense and the predictor's approximation with
the *signed* basis and all coefficients is regressed on the dense attention map (MSE sum, weight 0.01);
2) ``cls_distill``: only the backbone trains, with CE + 0.5 KL to a dense teacher + 0.5 MSE of the final
tokens. In phase 1 the dense teacher *is* the frozen backbone, so its attention maps are the model's
own dense maps, which :meth:`Sparsifiner.forward_distill` returns.

Variants: ``sparsifiner_deit_small`` (DeiT-S base: D=384, 12 blocks, 6 heads, LN eps 1e-6) and
``sparsifiner_lvvit_small`` (LV-ViT-S base: 16 blocks, mlp ratio 3, no qkv bias, residual branches
divided by ``skip_lam = 2``, a 4-conv patch stem, ``aux_head`` over patch tokens; the output is
``head(cls) + 0.5 * max_tokens(aux_head(tokens))`` as in TokenLabeling's evaluation). The official code
returns the class logits alone in training, which leaves ``aux_head`` without gradient (no token labels
in this recipe) and stops DDP on unused parameters; here training returns the same output as
evaluation, so the aux head fine-tunes with the class label. ``forward_distill`` keeps the official
training outputs.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ..layers import plain_feature_indices
from ..losses.sparsifiner import SparsifinerDistillLoss, attach_aux_loss, attn_self_distill_loss  # noqa: F401 (re-export)
from ..ops.sparse_attention import sparse_attention, sparse_attention_backend, sparsifiner_keys, top_indices
from ._input import record_input_size
from ._loading import load_checkpoint_strict
from ._registry import ModelMeta, register_meta
from ._shared import TOKEN_POOLS, TimmApi, build_family_model, check_pool, family_cfg, run_block

__all__ = ["Sparsifiner", "SparsifinerDistillLoss"]

_logger = logging.getLogger(__name__)

_MODES = ("sparse", "dense", "recon")
# The C key selection (MaskPredictor.forward) from this many tokens on: measured 18% faster end to end
# at 577 tokens (384 px) and 10% slower at 197 (224 px), where embedding_bag + topk are cheap already.
CPU_KERNEL_MIN_TOKENS = 300


def resample_token_rows(rows: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                        scale_sum: bool = False) -> torch.Tensor:
    """Resample a per-token parameter ``(1 + old_h * old_w, K)`` (class row first) to a new grid.

    The grid rows are resampled bicubically like a position embedding, the class row is kept. With
    ``scale_sum`` the grid rows are multiplied by ``old_tokens / new_tokens`` so that a sum over tokens
    keeps its magnitude (used for ``proj_n``).
    """
    if tuple(new_grid) == tuple(old_grid):
        return rows
    out = resample_abs_pos_embed(rows.unsqueeze(0), list(new_grid), list(old_grid), num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True, verbose=False)[0]
    if scale_sum:
        ratio = (old_grid[0] * old_grid[1]) / (new_grid[0] * new_grid[1])
        out = torch.cat([out[:1], out[1:] * ratio], dim=0)
    return out


def grid_for(size: Tuple[int, int], patch_size: int) -> Tuple[int, int]:
    """Token grid of an (H, W) image; ``ValueError`` unless both sides are positive multiples of the patch."""
    if size[0] % patch_size or size[1] % patch_size or size[0] < patch_size or size[1] < patch_size:
        raise ValueError(f"Sparsifiner: image size {size[0]}x{size[1]} must be a positive multiple of the "
                         f"patch size {patch_size} in both directions")
    return size[0] // patch_size, size[1] // patch_size


# --- layers ---------------------------------------------------------------------------------------
class _SizedPatchEmbed(nn.Module):
    """Input checks shared by both stems: a fixed-size model takes only ``img_size``, a
    ``dynamic_img_size`` one any multiple of the patch size."""

    def setup_size(self, img_size: Tuple[int, int], patch_size: int, dynamic_img_size: bool) -> None:
        self.img_size, self.patch_size, self.dynamic_img_size = tuple(img_size), patch_size, dynamic_img_size
        self.grid_size = grid_for(self.img_size, patch_size)

    def check(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"Sparsifiner expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        size = (x.shape[-2], x.shape[-1])
        if self.dynamic_img_size:
            grid_for(size, self.patch_size)
        elif size != self.img_size:
            raise ValueError(f"Sparsifiner: this model was built for {self.img_size[0]}x{self.img_size[1]} "
                             f"inputs, got {size[0]}x{size[1]}; create it with dynamic_img_size=True or "
                             f"img_size={size}")


@register_notrace_module
class LVViTPatchEmbed(_SizedPatchEmbed):
    """LV-ViT's ``PatchEmbed4_2``: conv7x7/2 + 2x conv3x3 (64 ch, BN + ReLU), then conv8x8/8 to D.

    Output ``(B, H/16, W/16, D)``.
    """

    def __init__(self, img_size: Tuple[int, int] = (224, 224), in_chans: int = 3, embed_dim: int = 384,
                 stem_chs: int = 64, patch_size: int = 16, dynamic_img_size: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.setup_size(img_size, patch_size, dynamic_img_size)
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv2 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(stem_chs, **dd)
        self.conv3 = nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(stem_chs, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(stem_chs, embed_dim, patch_size // 2, stride=patch_size // 2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).permute(0, 2, 3, 1)


@register_notrace_module
class LinearPatchEmbed(_SizedPatchEmbed):
    """ViT patchify: conv of kernel = stride = ``patch_size``. Output ``(B, H/p, W/p, D)``."""

    def __init__(self, img_size: Tuple[int, int] = (224, 224), in_chans: int = 3, embed_dim: int = 384,
                 patch_size: int = 16, dynamic_img_size: bool = False, device=None, dtype=None):
        super().__init__()
        self.setup_size(img_size, patch_size, dynamic_img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.proj(x).permute(0, 2, 3, 1)


class MaskPredictor(nn.Module):
    """Sparsifiner's connectivity predictor (official name, so keys match; see the module docstring).

    Parameters: ``proj_c_q``, ``proj_c_k`` ``Linear(d, c)``; ``proj_n``, ``proj_back_n`` ``(N, K)`` with one
    row per token of ``grid_size`` plus the class token.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        keep_rate: float = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        basis_threshold: float = 0.02,
        coef_topk: int = 8,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_tokens = grid_size[0] * grid_size[1] + 1
        self.grid_size = tuple(grid_size)
        self.keep_rate = keep_rate
        self.reduced_c = head_dim // reduce_c_factor
        self.reduced_n = num_tokens // reduce_n_factor
        if self.reduced_c < 1 or self.reduced_n < 1:
            raise ValueError(f"Sparsifiner: head_dim {head_dim} / reduce_c_factor {reduce_c_factor} and "
                             f"{num_tokens} tokens / reduce_n_factor {reduce_n_factor} must both be >= 1")
        self.scale = num_heads ** -0.5  # the head COUNT, as in the official code
        self.basis_threshold = basis_threshold
        self.coef_topk = min(coef_topk, self.reduced_n)
        self.proj_c_q = nn.Linear(head_dim, self.reduced_c, **dd)
        self.proj_c_k = nn.Linear(head_dim, self.reduced_c, **dd)
        self.proj_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n, **dd))
        self.proj_back_n = nn.Parameter(torch.zeros(num_tokens, self.reduced_n, **dd))
        self.cpu_kernel = True  # CPU inference: select keys with the C kernel when it builds (see forward)

    def token_params(self, grid: Tuple[int, int], token_index: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``proj_n``, ``proj_back_n`` for the current tokens: ``(N, K)``, or ``(B, 1, N', K)`` after pruning
        (``token_index`` ``(B, N' - 1)`` holds the grid positions of the remaining patch tokens)."""
        proj_n = resample_token_rows(self.proj_n, grid, self.grid_size, scale_sum=True)
        proj_back_n = resample_token_rows(self.proj_back_n, grid, self.grid_size)
        if token_index is None:
            return proj_n, proj_back_n

        def select(p: torch.Tensor) -> torch.Tensor:
            B, K = token_index.shape[0], p.shape[-1]
            rows = p[1:][token_index]  # (B, N' - 1, K)
            return torch.cat([p[:1].expand(B, 1, K), rows], dim=1).unsqueeze(1)  # (B, 1, N', K)

        return select(proj_n), select(proj_back_n)

    def approx_attention(self, q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int],
                         token_index: Optional[torch.Tensor] = None, recon: bool = False) -> torch.Tensor:
        """Low-rank connectivity scores ``(B, H, N - 1, N)`` (no class-token row).

        ``recon=True`` is the reconstruction-training form: signed basis, all coefficients.
        """
        proj_n, proj_back_n = self.token_params(grid, token_index)
        q, k = self.proj_c_q(q), self.proj_c_k(k)  # (B, H, N, c)
        k = k.transpose(-2, -1) @ proj_n  # (B, H, c, K)
        basis = proj_back_n.transpose(-2, -1)  # (K, N) or (B, 1, K, N)
        cheap = ((q @ k) * self.scale)[..., 1:, :]  # (B, H, N - 1, K)
        coef = cheap.softmax(dim=-1)
        if not recon:
            basis = F.threshold(basis.abs(), self.basis_threshold, 0.0)
            top_idx = top_indices(cheap, self.coef_topk)  # on the logits: see kept_coefficients
            coef = torch.zeros_like(coef).scatter(-1, top_idx, coef.gather(-1, top_idx))
        return coef @ basis

    @torch.no_grad()
    def kept_coefficients(self, q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int],
                          token_index: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``coef_topk`` non-zero coefficients of every row of the inference-form ``coef``:
        ``cols`` ``(B, H, N - 1, t)`` (ascending; rows of ``table``), ``weights`` (same shape) and
        ``table`` ``(K, N)`` (``(B * K, N)`` after token pruning, ``cols`` offset per sample), the
        thresholded basis. ``approx = sum_j weights[..., j] * table[cols[..., j]]``."""
        proj_n, proj_back_n = self.token_params(grid, token_index)
        q, k = self.proj_c_q(q), self.proj_c_k(k)  # (B, H, N, c)
        k = k.transpose(-2, -1) @ proj_n  # (B, H, c, K)
        cheap = ((q @ k) * self.scale)[..., 1:, :]  # (B, H, N - 1, K)
        coef = cheap.softmax(dim=-1)
        B, K = coef.shape[0], coef.shape[-1]
        # The top coefficients are chosen on the logits: the softmax is increasing, so these are the official
        # coef.topk keys in exact arithmetic, but its fp32 rounding ties near-uniform rows (random init: all K
        # coefficients within ~2% of 1 / K) about once per thousand rows, the logits not once in the rows
        # measured (benchmarks/export_cpu.md, Sparsifiner section).
        cols = top_indices(cheap, self.coef_topk).sort(dim=-1).values
        table = F.threshold(proj_back_n.abs(), self.basis_threshold, 0.0).transpose(-2, -1)  # (K, N) | (B, 1, K, N)
        weights = coef.gather(-1, cols).to(table.dtype)  # autocast may have made coef bf16/fp16
        if table.dim() == 4:  # per-sample rows after token pruning: one table of B * K rows
            cols = cols + (torch.arange(B, device=cols.device) * K).view(B, 1, 1, 1)
        return cols, weights, table.reshape(-1, table.shape[-1]).contiguous()

    @torch.no_grad()
    def approx_attention_kept_coef(self, q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int],
                                   token_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`approx_attention` (inference form), without the dense ``coef @ basis`` product.

        Only ``coef_topk`` of the ``K`` coefficients of a row are non-zero, so each score row is a weighted
        sum of ``coef_topk`` basis rows: one ``embedding_bag`` (``coef_topk / K`` of the multiply-adds, no
        ``(B, H, N - 1, K)`` zero-filled coefficient tensor). The kept basis rows are summed in ascending
        order, the order of the dense product (its other terms are exact zeros), so the scores, and with
        them the ``topk`` keys, are the official ones: bitwise equal on the CPUs tested here (a BLAS that
        splits the ``K`` sum would differ in the last bit). No gradient (the mask carries none).
        """
        cols, weights, table = self.kept_coefficients(q, k, grid, token_index)
        B, H, M, t = cols.shape
        approx = F.embedding_bag(cols.reshape(-1, t), table, per_sample_weights=weights.reshape(-1, t), mode="sum")
        return approx.view(B, H, M, table.shape[-1])

    def key_budget(self, num_tokens: int, full_tokens: int, pruned: bool) -> int:
        budget = math.ceil(self.keep_rate * full_tokens)
        return min(budget, num_tokens - 1 if pruned else num_tokens)

    def forward(self, q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int],
                token_index: Optional[torch.Tensor] = None, with_grad: bool = False, official: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Kept key indices ``(B, H, N - 1, budget)`` for every query row but the class token's, and (with
        ``with_grad``) the scores they come from, differentiable in the predictor's parameters only.

        ``official=False`` computes the scores from the kept coefficients (same keys, less work) on CPU
        (where it was measured): in one C pass per row that also selects the keys
        (:func:`visionzoo.ops.sparse_attention.sparsifiner_keys`) when the kernel builds, ``cpu_kernel`` is True and
        there are at least ``CPU_KERNEL_MIN_TOKENS`` tokens, else :meth:`approx_attention_kept_coef`
        and :func:`~visionzoo.ops.sparse_attention.top_indices`; elsewhere (CUDA, and the meta device, so a FLOP counter sees
        the official dense product) the official dense product runs.
        """
        budget = self.key_budget(q.shape[2], 1 + grid[0] * grid[1], token_index is not None)
        if with_grad:
            approx = self.approx_attention(q.detach(), k.detach(), grid, token_index)
            return top_indices(approx.detach(), budget), approx
        with torch.no_grad():  # the mask carries no gradient (official ``attn_mask.detach_()``)
            if official or q.device.type != "cpu":
                approx = self.approx_attention(q, k, grid, token_index)
            else:
                cols, weights, table = self.kept_coefficients(q, k, grid, token_index)
                use_kernel = self.cpu_kernel and q.shape[2] >= CPU_KERNEL_MIN_TOKENS
                return sparsifiner_keys(cols, weights, table, budget, backend="auto" if use_kernel else "torch"), None
            return top_indices(approx, budget), None


class SparsifinerAttention(nn.Module):
    """Multi-head self-attention with a connectivity predictor. x ``(B, N, C)`` -> ``(B, N, C)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        predictor_kwargs: Optional[Dict[str, Any]] = None,
        attn_backend: str = "auto",
        self_distill_weight: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f"Sparsifiner: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        self.self_distill_weight = self_distill_weight
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_predictor = MaskPredictor(self.head_dim, num_heads, grid_size, **(predictor_kwargs or {}), **dd)

    def forward(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        token_index: Optional[torch.Tensor] = None,
        mode: str = "sparse",
        need_cls_attn: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns ``(out, cls_attn (B, H, N) or None, approx (B, H, N-1, N) or None, attn (B, H, N, N) or None)``.

        ``mode``: ``"sparse"`` (the model), ``"dense"`` (full attention, returns its map: the dense teacher),
        ``"recon"`` (dense attention plus the predictor's reconstruction-form approximation).
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d)
        approx = attn = None
        if mode == "sparse":
            self_distill = self.training and self.self_distill_weight > 0 and torch.is_grad_enabled()
            official = sparse_attention_backend(self.attn_backend, q) == "reference"
            idx, approx_grad = self.mask_predictor(q, k, grid, token_index, with_grad=self_distill,
                                                   official=official)
            out = sparse_attention(q, k, v, idx, self.scale, dense_rows=1, backend=self.attn_backend)
            if self_distill:  # official ATTN_SELF_DISTILL: trains the predictor in any backward
                loss = attn_self_distill_loss(approx_grad, q, k, self.scale, self.self_distill_weight)
                out = attach_aux_loss(out, loss)
        else:
            if mode == "recon":
                approx = self.mask_predictor.approx_attention(q, k, grid, token_index, recon=True)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = attn @ v
        cls_attn = attn[:, :, 0] if attn is not None and need_cls_attn else self._cls_attn(q, k, need_cls_attn)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out, cls_attn, approx, attn

    def _cls_attn(self, q: torch.Tensor, k: torch.Tensor, needed: bool) -> Optional[torch.Tensor]:
        """The class token's (dense) attention row ``(B, H, N)``, or None when not ``needed``."""
        if not needed:
            return None
        return ((q[:, :, :1] @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)[:, :, 0]


@register_notrace_module
class SparsifinerBlock(nn.Module):
    """Pre-norm block ``x + attn(norm1(x)) / skip_lam``, ``x + mlp(norm2(x)) / skip_lam``, with optional
    token pruning after the block (``token_keep_rate < 1``).

    A tracing leaf: its token budget and pruning depend on the runtime token count.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        skip_lam: float = 1.0,
        norm_eps: float = 1e-6,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        token_keep_rate: float = 1.0,
        predictor_kwargs: Optional[Dict[str, Any]] = None,
        attn_backend: str = "auto",
        self_distill_weight: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.skip_lam = skip_lam
        self.token_keep_rate = token_keep_rate
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.attn = SparsifinerAttention(dim, num_heads, grid_size, qkv_bias=qkv_bias, proj_drop=proj_drop,
                                         predictor_kwargs=predictor_kwargs, attn_backend=attn_backend,
                                         self_distill_weight=self_distill_weight, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], token_index: Optional[torch.Tensor] = None,
                mode: str = "sparse"):
        """x ``(B, N, C)`` -> ``(x, token_index, approx, attn)``; ``x`` has fewer tokens after a pruning block."""
        prune = self.token_keep_rate < 1.0
        out, cls_attn, approx, attn = self.attn(self.norm1(x), grid, token_index, mode, need_cls_attn=prune)
        x = x + self.drop_path(out) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        if prune:
            B, N, C = x.shape
            budget = min(math.ceil(self.token_keep_rate * grid[0] * grid[1]), N - 1)
            score = cls_attn[..., 1:].mean(dim=1)  # (B, N - 1): head-mean class attention
            keep = top_indices(score, budget).sort(dim=-1).values  # original order
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, C))], dim=1)
            token_index = keep if token_index is None else token_index.gather(1, keep)
        return x, token_index, approx, attn


@register_notrace_function
def add_cls_and_pos_embed(x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor,
                          base_grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W, D) patch tokens -> (B, 1 + H*W, D): class token first, position embedding added
    (resampled bicubically when the grid differs from ``base_grid``)."""
    B, H, W, D = x.shape
    if (H, W) != tuple(base_grid):
        pos_embed = resample_abs_pos_embed(pos_embed, [H, W], list(base_grid), num_prefix_tokens=1, verbose=False)
    x = torch.cat([cls_token.expand(B, -1, -1), x.reshape(B, H * W, D)], dim=1)
    return x + pos_embed


@register_notrace_function
def scatter_to_grid(tokens: torch.Tensor, token_index: Optional[torch.Tensor], num_patches: int) -> torch.Tensor:
    """Patch tokens ``(B, n, D)`` at grid positions ``token_index`` ``(B, n)`` -> ``(B, num_patches, D)`` with
    zeros where tokens were pruned (the identity when nothing was pruned)."""
    if token_index is None:
        return tokens
    B, _, D = tokens.shape
    out = tokens.new_zeros(B, num_patches, D)
    return out.scatter(1, token_index.unsqueeze(-1).expand(-1, -1, D), tokens)


class Sparsifiner(TimmApi, nn.Module):
    """Sparsifiner on a DeiT (``stem="linear"``) or LV-ViT (``stem="lvvit"``) base.

    Args:
        img_size: input size the position embedding and the predictors' token rows are laid out for.
        patch_size: 16 (the LV-ViT stem is built for 16).
        in_chans, num_classes, global_pool: timm conventions; ``global_pool`` in ``'token'``, ``'avg'``, ``''``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_eps: the ViT.
        stem: ``"linear"`` (ViT patchify) or ``"lvvit"`` (4-conv stem).
        skip_lam: residual branch divisor (LV-ViT: 2).
        aux_head: LV-ViT's per-token head; the logits add ``0.5 * max over tokens`` (train and eval).
        attn_keep_rate: fraction of keys each query keeps (0.25).
        reduce_n_factor, reduce_c_factor: predictor ranks ``K = N // reduce_n_factor``, ``c = d // reduce_c_factor``.
        basis_threshold, coef_topk: predictor sparsification at inference / sparse training (0.02, 8).
        token_keep_rate, token_pruning_loc: token sparsity; block ``token_pruning_loc[j]`` keeps
            ``token_keep_rate ** (j + 1)`` of the patch tokens (off by default, as released).
        drop_rate, pos_drop_rate, proj_drop_rate, drop_path_rate: dropouts (linear stochastic depth).
        dynamic_img_size: accept any size the patches tile, resampling position embedding and predictors.
        attn_backend: :func:`~visionzoo.ops.sparse_attention.sparse_attention` backend.
        attn_self_distill_weight: trains the predictors during sparse training with the official
            attention self-distillation loss (``ATTN_SELF_DISTILL``: MSE sum between each block's
            approximation and its own dense map, averaged over blocks, times this weight; default 0.002,
            the released config's value). The loss is attached to the block outputs
            (:func:`visionzoo.losses.attach_aux_loss`), so any backward through the model applies it;
            inputs and target are detached, so it trains the predictors only. 0: the predictors get no
            gradient from the sparse forward, as in the official phase 2 (the mask is detached).
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        stem: str = "linear",
        skip_lam: float = 1.0,
        aux_head: bool = False,
        attn_keep_rate: float = 0.25,
        reduce_n_factor: int = 6,
        reduce_c_factor: int = 2,
        basis_threshold: float = 0.02,
        coef_topk: int = 8,
        token_keep_rate: float = 1.0,
        token_pruning_loc: Tuple[int, ...] = (),
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        attn_backend: str = "auto",
        attn_self_distill_weight: float = 0.002,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_pool("Sparsifiner", global_pool, TOKEN_POOLS)
        if stem not in ("linear", "lvvit"):
            raise ValueError(f"Sparsifiner: stem must be 'linear' or 'lvvit', got {stem!r}")
        if not 0.0 < attn_keep_rate <= 1.0 or not 0.0 < token_keep_rate <= 1.0:
            raise ValueError("Sparsifiner: attn_keep_rate and token_keep_rate must be in (0, 1]")
        if any(not 0 <= i < depth for i in token_pruning_loc):
            raise ValueError(f"Sparsifiner: token_pruning_loc {token_pruning_loc} must index blocks 0..{depth - 1}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.img_size = to_2tuple(img_size)
        self.grid_size = grid_for(self.img_size, patch_size)

        embed_cls = LVViTPatchEmbed if stem == "lvvit" else LinearPatchEmbed
        self.patch_embed = embed_cls(self.img_size, in_chans, embed_dim, patch_size=patch_size,
                                     dynamic_img_size=dynamic_img_size, **dd)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        predictor_kwargs = dict(keep_rate=attn_keep_rate, reduce_n_factor=reduce_n_factor,
                                reduce_c_factor=reduce_c_factor, basis_threshold=basis_threshold, coef_topk=coef_topk)
        keep = [1.0] * depth
        for j, i in enumerate(sorted(token_pruning_loc)):
            keep[i] = token_keep_rate ** (j + 1)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            SparsifinerBlock(
                embed_dim, num_heads, self.grid_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, skip_lam=skip_lam,
                norm_eps=norm_eps, proj_drop=proj_drop_rate, drop_path=dpr[i], token_keep_rate=keep[i],
                predictor_kwargs=predictor_kwargs, attn_backend=attn_backend,
                self_distill_weight=attn_self_distill_weight / depth, **dd)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.aux_head = (nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()) if aux_head else None
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.init_weights()

    # --- init -------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The official init: trunc-normal(0.02) for pos / cls, every Linear weight (predictor included)
        and ``proj_n`` / ``proj_back_n``; zero Linear biases; LayerNorm 1 / 0; convs keep PyTorch's init."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MaskPredictor):
                trunc_normal_(m.proj_n, std=0.02)
                trunc_normal_(m.proj_back_n, std=0.02)

    # --- timm API ---------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            check_pool("Sparsifiner", global_pool, TOKEN_POOLS)
            self.global_pool = global_pool
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[int] = None) -> None:
        """Change the native input size, resampling ``pos_embed`` and every predictor's token rows."""
        if patch_size is not None:
            raise ValueError("Sparsifiner: changing patch_size is not supported")
        if img_size is None:
            return
        old, new = self.grid_size, grid_for(to_2tuple(img_size), self.patch_size)
        self.img_size, self.grid_size = to_2tuple(img_size), new
        self.patch_embed.setup_size(self.img_size, self.patch_size, self.dynamic_img_size)
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed.data, list(new), list(old),
                                                                 num_prefix_tokens=1, verbose=False))
            for block in self.blocks:
                mp = block.attn.mask_predictor
                mp.proj_n = nn.Parameter(resample_token_rows(mp.proj_n.data, new, old, scale_sum=True))
                mp.proj_back_n = nn.Parameter(resample_token_rows(mp.proj_back_n.data, new, old))
                mp.grid_size = new
        record_input_size(self, self.img_size)

    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a DeiT / LV-ViT / official Sparsifiner checkpoint (or a visionzoo one) strictly; a
        backbone-only file leaves the predictors at their fresh init (logged, not an error)."""
        load_checkpoint_strict(self, checkpoint_path, checkpoint_filter_fn)

    # --- forward ----------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.patch_embed(x)  # (B, h, w, D)
        grid = (x.shape[1], x.shape[2])
        x = add_cls_and_pos_embed(x, self.cls_token, self.pos_embed, self.grid_size)
        return self.pos_drop(x), grid

    output_fmts = ("NCHW", "NLC")

    def _intermediates(self, x: torch.Tensor, indices, norm: bool, stop_early: bool, output_fmt: str,
                       return_prefix_tokens: bool = False):
        """Block outputs at stride ``patch_size``, through the final norm with ``norm``: ``'NCHW'`` (B, D, h, w)
        or ``'NLC'`` (B, h*w, D); pruned tokens are zeros in the maps (official semantics);
        ``return_prefix_tokens`` pairs each with its class token (B, D)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        B = x.shape[0]
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        token_index = None
        intermediates, prefix = [], []
        for i, block in enumerate(blocks):
            x, token_index, _, _ = run_block(self, block, x, grid, token_index)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix.append(y[:, 0])
                spatial = scatter_to_grid(y[:, 1:], token_index, grid[0] * grid[1])  # (B, h*w, D)
                if output_fmt == "NCHW":
                    spatial = spatial.reshape(B, grid[0], grid[1], spatial.shape[-1]).permute(0, 3, 1, 2).contiguous()
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
        """(B, C, H, W) -> normalised tokens (B, 1 + n, D), class token first (n = h*w unless pruned)."""
        x, grid = self._embed(x)
        token_index = None
        for block in self.blocks:
            x, token_index, _, _ = run_block(self, block, x, grid, token_index)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "":
            return x if pre_logits else self._dense_logits(x)
        pooled = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        pooled = self.head_drop(pooled)
        if pre_logits:
            return pooled
        out = self.head(pooled)
        if self.aux_head is not None and self.num_classes > 0:
            out = out + 0.5 * self.aux_head(x[:, 1:]).max(dim=1)[0]  # TokenLabeling's inference output
        return out

    def _dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled head: per-token logits (identity when ``num_classes == 0``)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_distill(self, x: torch.Tensor, mode: str = "sparse") -> Dict[str, Any]:
        """Everything the training losses need, in one pass.

        Args:
            mode: ``"sparse"`` (the model), ``"dense"`` (full attention: the dense teacher) or ``"recon"``
                (dense attention plus the predictors' reconstruction-form approximations).
        Returns:
            dict with ``logits`` (B, classes) (the class head; training output), ``tokens`` (B, n, D') the
            tokens distilled in ``cls_distill`` (normalised patch tokens, or ``aux_head`` outputs for
            LV-ViT as in the official code), ``token_index`` (B, n) or None, and per-block lists
            ``approx`` ((B, H, N-1, N), ``recon``) and ``attn`` ((B, H, N, N), ``dense`` / ``recon``).
        """
        if mode not in _MODES:
            raise ValueError(f"Sparsifiner: mode must be one of {_MODES}, got {mode!r}")
        x, grid = self._embed(x)
        token_index = None
        approx_list, attn_list = [], []
        for block in self.blocks:
            x, token_index, approx, attn = run_block(self, block, x, grid, token_index, mode)
            approx_list.append(approx)
            attn_list.append(attn)
        x = self.norm(x)
        tokens = x[:, 1:] if self.aux_head is None else self.aux_head(x[:, 1:])
        return dict(logits=self.head(self.head_drop(x[:, 0])), tokens=tokens, token_index=token_index,
                    approx=approx_list, attn=attn_list)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Sparsifiner) -> Dict[str, torch.Tensor]:
    """Adapt a DeiT, LV-ViT or official Sparsifiner state dict (or training file) to :class:`Sparsifiner`.

    Accepts ``{"model": ...}`` / ``{"state_dict": ...}`` containers and ``module.`` prefixes; resamples
    ``pos_embed`` and the predictors' token rows to the model's grid; drops DeiT's distillation
    entries if present. Predictor weights missing from a backbone-only file (timm DeiT-S, LV-ViT-S) are
    taken from the model's fresh init and reported in the log, so the result loads strictly.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k == "pos_embed" and v.shape != own[k].shape:
            side = math.isqrt(v.shape[1] - 1)
            v = resample_abs_pos_embed(v, list(model.grid_size), [side, side], num_prefix_tokens=1, verbose=False)
        elif k.endswith(("mask_predictor.proj_n", "mask_predictor.proj_back_n")) and k in own and v.shape != own[k].shape:
            if v.shape[1] != own[k].shape[1]:
                raise ValueError(
                    f"Sparsifiner: {k} has rank K={v.shape[1]} in the checkpoint but {own[k].shape[1]} in a model "
                    f"built for {model.img_size[0]}x{model.img_size[1]} (K = tokens // reduce_n_factor); build the "
                    f"model at the checkpoint's size with dynamic_img_size=True, or call set_input_size() after "
                    f"loading: both keep K and resample the token rows")
            side = math.isqrt(v.shape[0] - 1)
            v = resample_token_rows(v, model.grid_size, (side, side), scale_sum=k.endswith("proj_n"))
        out[k] = v
    missing = [k for k in own if k not in out and ".mask_predictor." in k]
    if missing:
        _logger.info("Sparsifiner: %d connectivity-predictor tensors are not in the checkpoint and keep their "
                     "fresh init (expected for a DeiT / LV-ViT backbone checkpoint)", len(missing))
        for k in missing:
            out[k] = own[k]
    return out


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> Sparsifiner:
    out_indices = plain_feature_indices(kwargs.get("depth", 12))
    return build_family_model(Sparsifiner, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return family_cfg(url, dict(
        pool_size=None, crop_pct=0.875, license="mit", paper_ids="arXiv:2303.13755",
        fixed_input_size=True,  # built for one size (img_size); see set_input_size / dynamic_img_size
        paper_name="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
        origin_url="https://github.com/lim142857/Sparsifiner"), **kwargs)


# No Sparsifiner checkpoints exist; the tags load the backbones the recipe starts from (the
# predictors stay freshly initialised). custom_load: the files go through Sparsifiner.load_pretrained.
default_cfgs = generate_default_cfgs({
    "sparsifiner_deit_small.deit_in1k": _cfg(
        url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth", custom_load=True,
        license="apache-2.0", notes=("backbone only: DeiT-S weights, predictors untrained",)),
    "sparsifiner_lvvit_small.lvvit_in1k": _cfg(
        url="https://github.com/zihangJiang/TokenLabeling/releases/download/1.0/lvvit_s-26M-224-83.3.pth.tar",
        custom_load=True, crop_pct=0.9, first_conv="patch_embed.conv1", license="apache-2.0",
        notes=("backbone only: LV-ViT-S weights, predictors untrained",)),
    "test_sparsifiner.untrained": _cfg(input_size=(3, 64, 64), license=None),
})


@register_model
def sparsifiner_deit_small(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-S (D=384, 12 blocks, 6 heads), keep rate 0.25."""
    model_args = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6)
    return _create_sparsifiner("sparsifiner_deit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_lvvit_small(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on LV-ViT-S (D=384, 16 blocks, 6 heads, mlp 3, conv stem, skip_lam 2, aux head)."""
    model_args = dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, qkv_bias=False, norm_eps=1e-5,
                      stem="lvvit", skip_lam=2.0, aux_head=True)
    return _create_sparsifiner("sparsifiner_lvvit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def test_sparsifiner(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """A tiny Sparsifiner for tests: 64x64 inputs (17 tokens), D=64, 3 blocks, token pruning after block 1."""
    model_args = dict(img_size=64, embed_dim=64, depth=3, num_heads=2, reduce_n_factor=4,
                      token_keep_rate=0.7, token_pruning_loc=(1,))
    return _create_sparsifiner("test_sparsifiner", pretrained, **dict(model_args, **kwargs))


_ORIGIN = "https://github.com/lim142857/Sparsifiner"
# GMACs at 224 from visionzoo.utils.count_macs with the default backend: the sparse op counts its kept
# connections (theoretical); the official dense-then-mask cost (attn_backend="reference") is 4.775 / 6.786.
for _name, _params, _gmacs in (
    ("sparsifiner_deit_small", 22_251_880, 4.509),
    ("sparsifiner_lvvit_small", 26_420_112, 6.432),
):
    register_meta(_name, ModelMeta("sparsifiner", _params, _gmacs, None, _ORIGIN, "mit", None))
register_meta("test_sparsifiner", ModelMeta("sparsifiner"))
