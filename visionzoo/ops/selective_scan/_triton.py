"""``triton`` backend: a fused selective-scan forward written in Triton.

One program per (batch element, block of ``BLOCK_D`` channels) loops over the sequence with the state
``(BLOCK_D, N)`` in fp32 registers (kernel in :mod:`._triton_kernel`). Inputs may be fp32, fp16 or
bf16 (math in fp32), with any strides; ``out`` is in ``u``'s dtype (time-major when ``u`` is a
time-major view, otherwise contiguous) and ``last_state`` is fp32 ``(batch, dim, N)``, as for the
``chunked`` backend. The backward is the ``chunked`` analytic backward (states recomputed, no
``(batch, dim, L, N)`` storage).

Triton is imported lazily (never at ``visionzoo`` import time) and any failure to import it makes the
backend unavailable. It runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` is
set in the environment before Triton is first imported (Triton's interpreter; slow, meant for tests;
see :func:`interpret_enabled`). Our kernel is wrapped by ``triton.jit`` on first use, separately for
CPU and CUDA tensors.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

_UNSET = object()
_kernel_module: object = _UNSET
_jitted: dict[str, object] = {}

# Input dtypes the kernel handles (fp64 runs on ``chunked``, see ``_op.resolve``).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load():
    """The kernel module, or None when Triton cannot be imported (cached)."""
    global _kernel_module
    if _kernel_module is _UNSET:
        mod = None
        try:
            if importlib.util.find_spec("triton") is not None:
                from . import _triton_kernel as mod
        except Exception:  # noqa: BLE001 - a broken install must not break visionzoo
            mod = None
        _kernel_module = mod
    return _kernel_module


def interpret_enabled() -> bool:
    """``TRITON_INTERPRET=1`` is set, and Triton was imported under it.

    Triton wraps its own ``triton.language`` helpers (``tl.zeros``, ``tl.sum``, ...) with ``triton.jit``
    when it is imported, and that wrapping reads ``TRITON_INTERPRET``: if Triton was imported before the
    variable was set, the helpers are compiled-mode functions and the interpreter cannot run a kernel
    that uses them. (torch imports Triton early, e.g. on ``torch.library.custom_op``, so the variable
    must be in the environment before ``torch.library`` / ``visionzoo`` is imported.)
    """
    if os.environ.get("TRITON_INTERPRET", "0").strip() != "1" or load() is None:
        return False
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.standard.zeros, InterpretedFunction)
    except Exception:  # noqa: BLE001 - a Triton without these internals: no CPU interpreter support
        return False


def is_available(device_type: str) -> bool:
    if device_type == "cuda":
        return load() is not None
    if device_type == "cpu":
        return interpret_enabled()
    return False


def _kernel(device_type: str):
    """``triton.jit`` of the kernel, wrapped once per device type (CPU: interpreter)."""
    fn = _jitted.get(device_type)
    if fn is None:
        import triton

        fn = triton.jit(load().selective_scan_fwd_kernel)
        _jitted[device_type] = fn
    return fn


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    block_d: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Selective scan on validated inputs (``B, C`` as ``(batch, G, N, L)``); returns ``(out, last_state)``."""
    if not is_available(u.device.type):
        raise RuntimeError(f"selective_scan: backend 'triton' is not available on device type {u.device.type!r}")
    if u.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"selective_scan: backend 'triton' does not support dtype {u.dtype}")
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    if u.permute(2, 0, 1).is_contiguous():
        out = torch.empty((length, batch, dim), dtype=u.dtype, device=u.device).permute(1, 2, 0)
    else:
        out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)

    block_n = _next_pow2(dstate)
    if block_d is None:
        block_d = max(1, min(_next_pow2(dim), max(16, 1024 // block_n)))
    if block_d & (block_d - 1):
        raise ValueError("block_d must be a power of two")
    zz = z if z is not None else u
    grid = (batch, triton_cdiv(dim, block_d))
    _kernel(u.device.type)[grid](
        u, delta, A, B, C,
        D if D is not None else u, zz, delta_bias if delta_bias is not None else u,
        out, last_state,
        dim, length, dstate, dim // groups,
        *u.stride(), *delta.stride(), *zz.stride(), *out.stride(),
        *A.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=4,
    )
    return out, last_state


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
