"""The ``triton`` backend: fused gather-attention kernels over the kept keys (kernels in
:mod:`._triton_kernel`).

Forward: one launch for the ``P`` dense rows (every key) and one for the ``N - P`` sparse rows (their
``idx`` keys); each program walks its rows' key sets with an online softmax and never materialises a
score matrix or a gathered copy of K/V: ``K / N`` of the dense multiply-adds (plus the dense rows), at
the cost of scattered K/V row reads. Backward: the same two launches, recomputing the scores (no
``lse`` is kept from the forward; ``delta = rowsum(dout * out)`` uses the saved output), ``dq`` stored
per row and ``dk``/``dv`` accumulated with fp32 atomics, then cast to the inputs' dtype.

Inputs may be fp32, fp16 or bf16 (fp32 arithmetic inside) with any strides; fp64 runs elsewhere.
Triton is imported lazily (never at ``visionzoo`` import time) and a failed import makes the backend
unavailable. It runs on CUDA, and on CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is first imported; slow, for tests; see :func:`interpret_enabled`).

Block sizes: ``BLOCK_M`` query rows x ``BLOCK_K`` keys per step (module attributes ``BLOCK_M``,
``BLOCK_K``, ``NUM_WARPS``, or per call). The defaults have not been tuned on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._triton_build import TritonKernels, cdiv, interpret_enabled, next_pow2  # noqa: F401 - re-exported

KERNELS = TritonKernels(__package__ + "._triton_kernel")
load = KERNELS.load
is_available = KERNELS.is_available
unavailable_reason = KERNELS.unavailable_reason
_kernel = KERNELS.jit  # (device_type, name)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_M = 16
BLOCK_K = 16
NUM_WARPS = 4
# (BLOCK_M, BLOCK_K, num_warps) tiles that benchmarks/bench_sparse_attention_cuda.py sweeps on a GPU (the first is
# the default); benchmarks/gpu_compile.py compiles each of them for sm_80 / sm_90.
TILE_CONFIGS = ((16, 16, 4), (8, 32, 4), (4, 64, 4))


def _check(q: Tensor) -> None:
    if not is_available(q.device.type):
        raise RuntimeError(f"sparse_attention: backend 'triton' is not available on device type {q.device.type!r}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"sparse_attention: backend 'triton' supports float32/float16/bfloat16, not {q.dtype}")


def _launches(N: int, P: int, K: int, block_m: int):
    """(dense, rows, keys per row, grid rows) for the dense-row launch and the sparse-row launch."""
    out = []
    if P:
        out.append((True, P, N, cdiv(P, block_m)))
    if N - P:
        out.append((False, N - P, K, cdiv(N - P, block_m)))
    return out


def sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                            block_m: Optional[int] = None, block_k: Optional[int] = None) -> Tensor:
    _check(q)
    B, H, N, d = q.shape
    d_v, K = v.shape[-1], idx.shape[-1]
    bm, bk = block_m or BLOCK_M, block_k or BLOCK_K
    out = torch.empty(B, H, N, d_v, dtype=v.dtype, device=v.device)
    fn = _kernel(q.device.type, "sparse_attn_fwd_kernel")
    for dense, rows, n_keys, grid_m in _launches(N, dense_rows, K, bm):
        fn[(grid_m, B * H)](
            q, k, v, idx, out, out,
            H, N, dense_rows, rows, n_keys, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *out.stride(),
            d, d_v,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(d_v),
            DENSE=dense, STORE_LSE=False, num_warps=NUM_WARPS,
        )
    return out


def sparse_attention_triton_backward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                                     out: Tensor, grad_out: Tensor, needs: Tuple[bool, bool, bool],
                                     block_m: Optional[int] = None, block_k: Optional[int] = None
                                     ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients for ``q``, ``k``, ``v`` (None where ``needs`` is False); ``out`` is the forward's output."""
    _check(q)
    B, H, N, d = q.shape
    d_v, K = v.shape[-1], idx.shape[-1]
    bm, bk = block_m or BLOCK_M, block_k or BLOCK_K
    f32 = torch.float32
    delta = (grad_out.to(f32) * out.to(f32)).sum(-1).reshape(B * H, N).contiguous()
    dq = torch.empty(B, H, N, d, dtype=f32, device=q.device) if needs[0] else delta
    dk = torch.zeros(B, H, N, d, dtype=f32, device=q.device) if needs[1] else delta
    dv = torch.zeros(B, H, N, d_v, dtype=f32, device=q.device) if needs[2] else delta
    fn = _kernel(q.device.type, "sparse_attn_bwd_kernel")
    for dense, rows, n_keys, grid_m in _launches(N, dense_rows, K, bm):
        fn[(grid_m, B * H)](
            q, k, v, idx, grad_out, delta, dq, dk, dv,
            H, N, dense_rows, rows, n_keys, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *grad_out.stride(),
            d, d_v,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=next_pow2(d), BLOCK_DV=next_pow2(d_v),
            DENSE=dense, NEED_DQ=needs[0], NEED_DK=needs[1], NEED_DV=needs[2], num_warps=NUM_WARPS,
        )
    return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
            dv.to(v.dtype) if needs[2] else None)
