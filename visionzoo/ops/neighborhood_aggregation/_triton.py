"""``triton`` backend: ``na2d_av`` forward and both gradients as Triton kernels (:mod:`._triton_kernel`).

Forward: one program per ``(image * group, block of query pixels, block of channels)``; each pixel
computes its clamped window start and loops over the ``K*K`` taps, accumulating in fp32.
``d attn``: the same query-centric loop with a channel reduction per tap. ``d value``: the
inverse-neighbourhood gather (each key pixel visits the contiguous range of queries whose window
holds it), so the backward needs no atomics and is deterministic; see :mod:`._triton_kernel`.
Nothing of size ``H*W*K*K*c`` is ever materialised, and inputs are read through their strides (a
permuted view costs no copy). Inputs may be fp32, fp16 or bf16 (math in fp32, results in the
input dtype); fp64 goes to ``torch`` unless ``triton`` was asked for by name.

Triton is imported lazily (never at ``visionzoo`` import time) and any failure to import it makes the
backend unavailable. It runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` was
in the environment before Triton was first imported (Triton's interpreter: slow, for tests; see
:func:`interpret_enabled`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._triton_build import TritonKernels, cdiv, interpret_enabled, next_pow2  # noqa: F401 - re-exported

KERNELS = TritonKernels(__package__ + "._triton_kernel")
load = KERNELS.load
is_available = KERNELS.is_available
unavailable_reason = KERNELS.unavailable_reason
_kernel = KERNELS.jit  # (device_type, name)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_C = 64  # channels per program; more channels take more programs (d attn: an inner loop)


def _blocks(pixels: int, channels: int, block_p: int | None, block_c: int | None) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)``: up to 2048 fp32 accumulators per program, no block much larger than the map
    (a 7x7 map gets 64-pixel blocks, not 128)."""
    bc = block_c or min(next_pow2(channels), MAX_BLOCK_C)
    bp = block_p or min(max(16, min(128, 2048 // bc)), max(16, next_pow2(pixels)))
    for name, v in (("block_p", bp), ("block_c", bc)):
        if v & (v - 1):
            raise ValueError(f"na2d_av triton: {name} must be a power of two, got {v}")
    return bp, bc


def _check(attn: Tensor, value: Tensor) -> None:
    if not is_available(value.device.type):
        raise RuntimeError(f"neighborhood_aggregation: backend 'triton' is not available on device type "
                           f"{value.device.type!r}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"neighborhood_aggregation: backend 'triton' does not support dtype {value.dtype}")


def triton_forward(attn: Tensor, value: Tensor, kernel_size: int, *, block_p: int | None = None,
                   block_c: int | None = None) -> Tensor:
    """``attn`` ``(B, G, H, W, K*K)``, ``value`` ``(B, G, H, W, c)`` (any strides) -> contiguous ``(B, G, H, W, c)``."""
    _check(attn, value)
    B, G, H, W, C = value.shape
    out = torch.empty((B, G, H, W, C), dtype=value.dtype, device=value.device)
    bp, bc = _blocks(H * W, C, block_p, block_c)
    grid = (B * G, cdiv(H * W, bp), cdiv(C, bc))
    _kernel(value.device.type, "na2d_av_fwd_kernel")[grid](
        attn, value, out, G, H, W, C, *attn.stride(), *value.stride(), *out.stride(),
        K=kernel_size, BLOCK_P=bp, BLOCK_C=bc, num_warps=4,
    )
    return out


def triton_backward(attn: Tensor, value: Tensor, kernel_size: int, grad_out: Tensor, needs: tuple[bool, bool],
                    *, block_p: int | None = None, block_c: int | None = None
                    ) -> tuple[Tensor | None, Tensor | None]:
    """``(d attn, d value)`` (each None unless ``needs`` asks for it), contiguous, in the inputs' dtype."""
    _check(attn, value)
    B, G, H, W, C = value.shape
    bp, bc = _blocks(H * W, C, block_p, block_c)
    dev = value.device.type
    grad_attn = grad_value = None
    if needs[0]:
        grad_attn = torch.empty((B, G, H, W, kernel_size * kernel_size), dtype=attn.dtype, device=attn.device)
        _kernel(dev, "na2d_av_bwd_attn_kernel")[(B * G, cdiv(H * W, bp))](
            grad_out, value, grad_attn, G, H, W, C, *grad_out.stride(), *value.stride(), *grad_attn.stride(),
            K=kernel_size, BLOCK_P=bp, BLOCK_C=bc, ONE_CHUNK=C <= bc, num_warps=4,
        )
    if needs[1]:
        grad_value = torch.empty((B, G, H, W, C), dtype=value.dtype, device=value.device)
        _kernel(dev, "na2d_av_bwd_value_kernel")[(B * G, cdiv(H * W, bp), cdiv(C, bc))](
            attn, grad_out, grad_value, G, H, W, C, *attn.stride(), *grad_out.stride(), *grad_value.stride(),
            K=kernel_size, BLOCK_P=bp, BLOCK_C=bc, num_warps=4,
        )
    return grad_attn, grad_value
