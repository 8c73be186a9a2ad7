"""``triton`` backend: BRA with the region gather fused into flash attention (forward and backward).

The kernels (:mod:`._triton_kernel`) read the spatial ``(B, H, W, C)`` q/k/v through their strides and
compute the routed key addresses on the fly, so neither the official ``topk``-fold K/V copy nor any
region-major layout copy exists; the ``(w2, topk * w2)`` scores live in registers only. The forward
also returns a per-token, per-head fp32 row statistic (``lse``, base 2) that the backward reuses.

Inputs may be fp32, fp16 or bf16 (fp64 runs on ``chunked``, see ``_op.resolve``); softmax and
accumulation are fp32. fp32 matmuls are exact IEEE fp32 unless PyTorch's
``torch.backends.cuda.matmul.allow_tf32`` is set, in which case they use TF32 like PyTorch's own.

Triton is imported lazily (never at ``visionzoo`` import time) and any failure to import it makes the
backend unavailable. It runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` was
set before Triton was first imported (Triton's interpreter: slow, for tests); see
:func:`interpret_enabled`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._triton_build import TritonKernels, cdiv, interpret_enabled, launch_device_type, next_pow2  # noqa: F401

KERNELS = TritonKernels(__package__ + "._triton_kernel")
load = KERNELS.load
is_available = KERNELS.is_available
unavailable_reason = KERNELS.unavailable_reason
_kernel = KERNELS.jit  # (device_type, name)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def _check(q: Tensor) -> None:
    if not is_available(q.device.type):
        raise RuntimeError(f"bi_level_routing_attention: backend 'triton' is not available on device type "
                           f"{q.device.type!r} (CPU needs TRITON_INTERPRET=1 before Triton is imported)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"bi_level_routing_attention: backend 'triton' does not support dtype {q.dtype} "
                           f"(float32, float16, bfloat16)")


def _unit_channel_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _config(w2: int, d_qk: int, d_v: int, dtype: torch.dtype, device_type: str) -> dict:
    # Tiles: at least 16 (tl.dot), at most 64; a query tile covers a whole region when it fits.
    block_m = min(64, max(16, next_pow2(w2)))
    block_n = 64 if d_qk <= 64 else 32
    # fp32: exact IEEE products unless PyTorch allows TF32 (then as PyTorch's own matmuls); the setting
    # means nothing for 16-bit inputs, which use tensor cores either way.
    precision = "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    # Triton's interpreter multiplies bf16 tiles wrongly (see _triton_kernel): fp32 there.
    upcast = dtype == torch.bfloat16 and device_type == "cpu"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DQK=max(16, next_pow2(d_qk)),
                BLOCK_DV=max(16, next_pow2(d_v)), PRECISION=precision, UPCAST=upcast)


def _sp(x: Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def bra_triton_forward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_heads: int, n_h: int, n_w: int,
                       scale: float) -> Tuple[Tensor, Tensor]:
    """Spatial ``q``/``k`` ``(B, H, W, C_qk)``, ``v`` ``(B, H, W, C_v)`` (any strides), routing ``idx``
    ``(B, S2, topk)`` -> ``out`` ``(B, H, W, C_v)`` in ``v``'s dtype and ``lse`` ``(B, H, W, m)`` fp32."""
    _check(q)
    q, k, v = (_unit_channel_stride(x) for x in (q, k, v))
    B, H, W, c_qk = q.shape
    c_v, topk, m = v.shape[-1], idx.shape[-1], num_heads
    rh, rw = H // n_h, W // n_w
    S2, w2 = n_h * n_w, rh * rw
    out = torch.empty((B, H, W, c_v), dtype=v.dtype, device=v.device)
    lse = torch.empty((B, H, W, m), dtype=torch.float32, device=v.device)
    idx32 = idx.to(torch.int32).contiguous()
    cfg = _config(w2, c_qk // m, c_v // m, q.dtype, launch_device_type(q))
    grid = (cdiv(w2, cfg["BLOCK_M"]), S2, B * m)
    _kernel(q.device.type, "bra_fwd_kernel")[grid](
        q, k, v, out, lse, idx32,
        *_sp(q), *_sp(k), *_sp(v), *_sp(out), *_sp(lse),
        n_w, rh, rw, S2, topk, m, c_qk // m, c_v // m, float(scale) * LOG2E,
        num_warps=4, **cfg,
    )
    return out, lse


def _inverse_routing(idx: Tensor, S2: int) -> Tuple[Tensor, Tensor]:
    """CSR of the query regions routed to each key region: ``offsets`` ``(B, S2 + 1)`` and ``inverse``
    ``(B, S2 * topk)`` (int32); ``inverse[b, offsets[b, r]:offsets[b, r + 1]]`` lists the query regions
    that route to key region ``r``."""
    B, _, topk = idx.shape
    flat = idx.reshape(B, S2 * topk)
    order = torch.argsort(flat, dim=1, stable=True)
    inverse = (order // topk).to(torch.int32)
    counts = torch.zeros(B, S2, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    offsets = torch.zeros(B, S2 + 1, dtype=torch.int64, device=idx.device)
    offsets[:, 1:] = counts.cumsum(1)
    return offsets.to(torch.int32), inverse.contiguous()


def bra_triton_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                        num_heads: int, n_h: int, n_w: int, scale: float, grad_out: Tensor,
                        needs: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. spatial ``q``, ``k``, ``v`` (contiguous, the inputs' dtypes; ``None`` where
    ``needs`` says so)."""
    _check(q)
    q, k, v, grad_out = (_unit_channel_stride(x) for x in (q, k, v, grad_out))
    B, H, W, c_qk = q.shape
    c_v, topk, m = v.shape[-1], idx.shape[-1], num_heads
    rh, rw = H // n_h, W // n_w
    S2, w2 = n_h * n_w, rh * rw
    d_qk, d_v = c_qk // m, c_v // m
    # delta = rowsum(dO * O) per token and head, fp32, laid out like lse.
    delta = (grad_out.float() * out.float()).view(B, H, W, m, d_v).sum(-1).contiguous()
    idx32 = idx.to(torch.int32).contiguous()
    cfg = _config(w2, d_qk, d_v, q.dtype, launch_device_type(q))
    common = (n_w, rh, rw, S2, topk, m, d_qk, d_v, float(scale) * LOG2E, float(scale))
    dq = dk = dv = None
    if needs[0]:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grid = (cdiv(w2, cfg["BLOCK_M"]), S2, B * m)
        _kernel(q.device.type, "bra_bwd_dq_kernel")[grid](
            q, k, v, grad_out, lse, delta, dq, idx32,
            *_sp(q), *_sp(k), *_sp(v), *_sp(grad_out), *_sp(lse), *_sp(dq),
            *common, num_warps=4, **cfg,
        )
    if needs[1] or needs[2]:
        offsets, inverse = _inverse_routing(idx, S2)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        cfg_kv = dict(cfg, BLOCK_N=min(64, max(16, next_pow2(w2))), BLOCK_M=min(32, cfg["BLOCK_M"]))
        grid = (cdiv(w2, cfg_kv["BLOCK_N"]), S2, B * m)
        _kernel(q.device.type, "bra_bwd_dkdv_kernel")[grid](
            q, k, v, grad_out, lse, delta, dk, dv, offsets, inverse,
            *_sp(q), *_sp(k), *_sp(v), *_sp(grad_out), *_sp(lse), *_sp(dk), *_sp(dv),
            *common, num_warps=4, **cfg_kv,
        )
    return dq, dk if needs[1] else None, dv if needs[2] else None
