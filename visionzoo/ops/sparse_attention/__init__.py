"""Sparse attention over a per-query set of kept keys: the attention of Sparsifiner.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
Wei et al., CVPR 2023, arXiv 2303.13755; official code https://github.com/lim142857/Sparsifiner (MIT),
``src/models/sparsifiner.py`` (``Attention.forward``).

Semantics. With ``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)`` and ``P`` leading dense rows:

* rows ``i < P`` (the class token, ``P = 1`` in Sparsifiner) attend to all ``N`` keys;
* row ``i >= P`` attends to the keys ``idx[b, h, i - P, :]`` only (``K`` distinct indices in ``[0, N)``,
  e.g. the ``topk`` of the connectivity predictor's scores; duplicates are not allowed);
* ``out = softmax((q k^T) * scale restricted to the kept keys) @ v``.

That is exactly the official dense-then-mask computation (``masked_fill(-inf)``, softmax,
``nan_to_num``) for the official mask, which is ``topk`` over every row but the class row plus a dense
class row.

Backends (``backend=``, or ``auto``; ``VISIONZOO_BACKEND_SPARSE_ATTENTION`` overrides ``auto``; declared in
``_op.SPARSE``):

``reference``
    The official algorithm, dense scores then mask, as plain autograd ops outside the custom op (a
    FLOP counter sees the dense cost it executes).
``masked``
    One fused ``scaled_dot_product_attention`` with the connectivity as an additive ``0 / -inf`` mask;
    dense arithmetic, no score matrix in memory. ``auto``'s choice on CPU (fastest measured there).
``gather``
    Computes only the kept connections (``K / N`` of the dense MACs) from per-query gathered K/V,
    chunked over query rows (see :mod:`._gather`).
``triton``
    Fused Triton kernels, forward and backward (see :mod:`._triton`): each program walks its query
    rows' key sets with an online softmax, computing only the kept connections without a gathered
    copy; ``dk``/``dv`` by fp32 atomics. fp32 / fp16 / bf16. ``auto``'s first choice on CUDA, **not yet
    measured against** ``masked`` **on a GPU** (``benchmarks/bench_sparse_attention_cuda.py``); on CPU
    only in Triton's interpreter (``TRITON_INTERPRET=1``, tests), never picked by ``auto`` there. Its tile
    size: :func:`triton_tiles`.

The fast backends run through the custom op ``torch.ops.visionzoo.sparse_attention``: it runs on the
meta device, is differentiable in ``q``, ``k``, ``v``, and ``FlopCounterMode`` counts it with
:func:`sparse_attention_flops`, the cost of the kept connections only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import call
from ._op import BACKENDS, KEYS, SPARSE, flops as _flops, resolve, sparse_attention_op
from ._reference import keep_mask
from ._select import top_indices
from ._triton import TILE_CONFIGS

__all__ = ["sparse_attention", "sparse_attention_flops", "sparse_attention_backend", "sparsifiner_keys", "keep_mask",
           "triton_tiles", "TILE_CONFIGS", "BACKENDS", "top_indices"]


def sparse_attention_backend(backend: str, x: Tensor) -> str:
    """The backend ``sparse_attention(..., backend=backend)`` runs for tensors like ``x`` (``auto`` resolved,
    ``VISIONZOO_BACKEND_SPARSE_ATTENTION`` honoured); ``ValueError`` for an unknown name."""
    SPARSE.check_name(backend)
    return resolve(backend, x)


def triton_tiles(block_m: Optional[int] = None, block_k: Optional[int] = None,
                 num_warps: Optional[int] = None) -> tuple[int, int, int]:
    """The ``triton`` backend's tile for later calls: ``block_m`` query rows x ``block_k`` keys per step, with
    ``num_warps`` warps per program (defaults 16, 16, 4; not yet tuned on a GPU, which is what
    ``benchmarks/bench_sparse_attention_cuda.py`` sweeps). Sets the ones given and returns the tile now in
    use, ``(block_m, block_k, num_warps)``; ``triton_tiles()`` only reads it."""
    from . import _triton

    for name, value in (("block_m", block_m), ("block_k", block_k), ("num_warps", num_warps)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"triton_tiles: {name} must be a power of two, got {value}")
    _triton.BLOCK_M = block_m or _triton.BLOCK_M
    _triton.BLOCK_K = block_k or _triton.BLOCK_K
    _triton.NUM_WARPS = num_warps or _triton.NUM_WARPS
    return _triton.BLOCK_M, _triton.BLOCK_K, _triton.NUM_WARPS


def sparse_attention_flops(batch: int, heads: int, num_tokens: int, kept: int, dense_rows: int, d_qk: int,
                           d_v: int) -> int:
    """FLOPs (a multiply-add counts 2) of the kept connections of one call."""
    return _flops(batch, heads, num_tokens, kept, dense_rows, d_qk, d_v)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, *, dense_rows: int = 1,
                     backend: str = "auto") -> Tensor:
    """Attention restricted to per-query key sets.

    Args:
        q, k: ``(B, H, N, d)`` queries and keys.
        v: ``(B, H, N, d_v)`` values.
        idx: ``(B, H, N - dense_rows, K)`` integer key indices kept by each query row ``>= dense_rows``;
            ``1 <= K <= N``, distinct within a row.
        scale: the score scale (``d ** -0.5`` in Sparsifiner).
        dense_rows: leading query rows that attend to every key (1: the class token).
        backend: ``"auto"``, ``"reference"``, ``"masked"``, ``"gather"`` or ``"triton"``.

    Returns:
        ``(B, H, N, d_v)`` in ``v``'s dtype.
    """
    SPARSE.check_name(backend)
    for name, x in (("q", q), ("k", k), ("v", v), ("idx", idx)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"sparse_attention: {name} must be a 4-d tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    B, H, N, d = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"sparse_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must "
                         f"share (B, H, N), and k must match q")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("sparse_attention: q, k and v must share dtype and device")
    if not 0 <= dense_rows <= N:
        raise ValueError(f"sparse_attention: dense_rows={dense_rows} must be in [0, N={N}]")
    if idx.dtype not in (torch.int64, torch.int32) or idx.device != q.device:
        raise ValueError(f"sparse_attention: idx must be an int64/int32 tensor on {q.device}, got {idx.dtype} "
                         f"on {idx.device}")
    if tuple(idx.shape[:3]) != (B, H, N - dense_rows) or not 1 <= idx.shape[3] <= N:
        raise ValueError(f"sparse_attention: idx must have shape (B, H, N - dense_rows, K) = ({B}, {H}, "
                         f"{N - dense_rows}, K) with 1 <= K <= {N}, got {tuple(idx.shape)}")
    args = (q, k, v, idx.long(), float(scale), int(dense_rows))
    # reference runs as plain autograd ops (a FLOP counter sees its dense matmuls); the others through the
    # custom op, which selects the same backend again (and its backward) from the requested name.
    return SPARSE.dispatch(backend, q, lambda b: b.forward(*args) if b.name in ("reference", "flex")
                           else call(sparse_attention_op, *args, backend))


def sparsifiner_keys(cols: Tensor, weights: Tensor, table: Tensor, budget: int, *, backend: str = "auto") -> Tensor:
    """Sparsifiner's key selection: the ``budget`` highest-scoring keys of every query row, with the scores
    a sum of thresholded basis rows (no gradient).

    Args:
        cols: ``(..., T)`` int64 rows of ``table`` kept per query row, ascending.
        weights: ``(..., T)`` their coefficients.
        table: ``(R, N)`` basis rows (one row per kept coefficient position).
        budget: keys kept per row, ``1 <= budget <= N``.
        backend: ``"auto"``, ``"cpu"`` (one C pass per row, CPU fp32, ``N <= 8192``: scores and selection
            in L1, kept keys ascending) or ``"torch"`` (``embedding_bag`` + :func:`top_indices`, any device,
            kept keys in any order). Both keep the lowest indices where scores tie at the last kept score.
            ``VISIONZOO_BACKEND_SPARSE_KEYS`` overrides ``auto``; the C kernel never runs while tracing.

    Returns:
        ``(..., budget)`` int64 key indices; the same set from both backends.
    """
    KEYS.check_name(backend, "sparsifiner_keys")
    if cols.shape != weights.shape or table.dim() != 2 or not 1 <= budget <= table.shape[-1]:
        raise ValueError(f"sparsifiner_keys: cols {tuple(cols.shape)} and weights {tuple(weights.shape)} must match, "
                         f"table must be (R, N), got {tuple(table.shape)}, and 1 <= budget={budget} <= N")
    return KEYS.dispatch(backend, table, lambda b: b.forward(cols, weights, table, budget), keys=table.shape[-1],
                         weights_dtype=weights.dtype)
