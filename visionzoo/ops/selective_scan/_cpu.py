"""``cpu`` backend: a selective-scan forward in C (:file:`_cpu_kernel.c`) for fp32 CPU tensors.

Why: the ``chunked`` backend is bound by per-op dispatch and by writing ``exp(delta A)`` and the
states to memory (~5 ms per Vim-Tiny layer on one core, see ``benchmarks/selective_scan_cpu.md``);
a loop that keeps the state in registers and never leaves the core does the same work in about half
of that. Built, cached and loaded by :mod:`visionzoo.ops._cpu_build` (compiled on first use with the
system C compiler; unavailable without one, and ``auto`` then uses ``chunked``).

The backward is the ``chunked`` analytic backward (states recomputed from block checkpoints), so
training gives the same gradients as with ``chunked``.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import _cpu_build
from .._cpu_build import ptr
from ._chunked import LOG2E

OP = "selective_scan"
CB = 8  # channels per work item; must equal VZ_CB in the C source
NMAX = 256  # largest state size; must equal VZ_NMAX
SUPPORTED_DTYPES = (torch.float32,)


def _declare(lib: ctypes.CDLL) -> None:
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    seq = [fp, i64, i64, i64]  # pointer + (batch, dim, L) strides
    fn = lib.vz_selective_scan_fwd
    fn.argtypes = ([i64] * 5 + seq * 2 + [fp] * 5 + seq + [ctypes.c_int32] + seq + [ctypes.c_float, ctypes.c_int32]
                   + [fp, i64, i64])
    fn.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, Path(__file__).with_name("_cpu_kernel.c"), _declare)


def is_available(device_type: str) -> bool:
    return device_type == "cpu" and load() is not None


def _seq(x: Optional[Tensor]) -> tuple:
    """Pointer and strides of a ``(batch, dim, L)`` fp32 tensor (any strides), or NULL."""
    return (None, 0, 0, 0) if x is None else (ptr(x), *x.stride())


def _library_for(dstate: int) -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("selective_scan: the 'cpu' backend is unavailable (no C compiler or the build failed)")
    if dstate > NMAX:
        raise RuntimeError(f"selective_scan: the 'cpu' backend supports N <= {NMAX}, got {dstate}")
    return lib


def _per_channel(A: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor]) -> tuple:
    """``A * log2(e)`` (the kernel computes exp as exp2), ``D`` and ``delta_bias``: contiguous fp32."""
    f32 = torch.float32
    return ((A.to(f32) * LOG2E).contiguous(), D.to(f32).contiguous() if D is not None else None,
            delta_bias.to(f32).contiguous() if delta_bias is not None else None)


def _output(u: Tensor, channels: int) -> Tensor:
    """``(batch, channels, L)`` fp32: time-major memory when ``u`` is a time-major view, else contiguous."""
    batch, _, length = u.shape
    if u.permute(2, 0, 1).is_contiguous():
        return torch.empty(length, batch, channels, dtype=torch.float32).permute(1, 2, 0)
    return torch.empty(batch, channels, length, dtype=torch.float32)


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Selective scan on validated fp32 CPU inputs (``B, C`` as ``(batch, G, N, L)``).

    Returns ``out`` ``(batch, dim, L)`` (time-major strides when ``u`` is a time-major view, else
    contiguous) and ``last_state`` ``(batch, dim, N)`` fp32.
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    lib = _library_for(dstate)
    u, delta, z = (x.float() if x is not None else None for x in (u, delta, z))  # the kernel reads fp32 only
    A2, D, bias = _per_channel(A, D, delta_bias)
    Bt = B.float().transpose(2, 3).contiguous()  # (batch, G, L, N)
    Ct = C.float().transpose(2, 3).contiguous()
    out = _output(u, dim)
    last_state = torch.empty(batch, dim, dstate, dtype=torch.float32)
    head = (batch, dim, length, dstate, groups, *_seq(u), *_seq(delta), ptr(A2), ptr(Bt), ptr(Ct),
            ptr(D), ptr(bias), *_seq(z), int(bool(delta_softplus)), *_seq(out), 1.0, 0, ptr(last_state))
    if any(_cpu_build.run_items(lib.vz_selective_scan_fwd, head, batch * ((dim + CB - 1) // CB))):
        raise RuntimeError(f"selective_scan: the 'cpu' kernel rejected the inputs (N={dstate}, dim={dim}, "
                           f"groups={groups})")
    return out, last_state


def _seq_reversed(x: Optional[Tensor]) -> tuple:
    """Pointer and strides that walk a ``(batch, dim, L)`` tensor from ``t = L - 1`` down to 0."""
    if x is None:
        return (None, 0, 0, 0)
    sb, sd, sl = x.stride()
    return (ctypes.c_void_p(x.data_ptr() + (x.shape[-1] - 1) * sl * x.element_size()), sb, sd, -sl)


def selective_scan_bidirectional_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    reduce: str,
) -> tuple[Tensor, Tensor]:
    """Both directions of a Vim mixer with no flipped copies (the layout of ``reversed_inputs=True``).

    ``u, delta``: ``(batch, 2E, L)``, channels ``[E, 2E)`` (the backward direction) already time-reversed,
    as are groups ``[G/2, G)`` of ``B, C`` ``(batch, G, N, L)``; ``z``: None or ``(batch, E, L)`` shared,
    in the original order. The forward direction writes ``s * out_f`` (``s`` = 1/2 for ``reduce="mean"``,
    1 for ``"sum"``); the backward direction then walks ``z`` and the output from ``t = L - 1`` down
    (negative time strides) and adds ``s * out_b`` in place. ``reduce="none"`` writes the backward
    direction (back in the original order) as channels ``[E, 2E)`` instead.

    Returns ``out`` (``(batch, E, L)``, or ``(batch, 2E, L)`` for ``"none"``; time-major when ``u`` is) and
    ``last_state`` ``(batch, 2E, N)`` (the backward direction's after its last step, ``t = 0``).
    """
    batch, dim2, length = u.shape
    E, G2, dstate = dim2 // 2, B.shape[1] // 2, B.shape[2]
    lib = _library_for(dstate)
    u, delta, z = (x.float() if x is not None else None for x in (u, delta, z))  # the kernel reads fp32 only
    A2, D, bias = _per_channel(A, D, delta_bias)
    out = _output(u, dim2 if reduce == "none" else E)
    last_states = []
    scale = 0.5 if reduce == "mean" else 1.0
    items = batch * ((E + CB - 1) // CB)
    halves = (slice(0, E), slice(E, dim2))
    for direction, ch in enumerate(halves):
        grp = slice(direction * G2, (direction + 1) * G2)
        Bt = B[:, grp].float().transpose(2, 3).contiguous()  # (batch, G/2, L, N)
        Ct = C[:, grp].float().transpose(2, 3).contiguous()
        last_states.append(torch.empty(batch, E, dstate, dtype=torch.float32))
        backward = direction == 1
        if reduce == "none":
            o, accumulate = out[:, ch], 0
        else:
            o, accumulate = out, int(backward)
        head = (batch, E, length, dstate, G2, *_seq(u[:, ch]), *_seq(delta[:, ch]), ptr(A2[ch]), ptr(Bt),
                ptr(Ct), ptr(D[ch] if D is not None else None),
                ptr(bias[ch] if bias is not None else None),
                *(_seq_reversed(z) if backward else _seq(z)), int(bool(delta_softplus)),
                *(_seq_reversed(o) if backward else _seq(o)), scale, accumulate, ptr(last_states[-1]))
        if any(_cpu_build.run_items(lib.vz_selective_scan_fwd, head, items)):
            raise RuntimeError(f"selective_scan: the 'cpu' kernel rejected the inputs (N={dstate}, dim={E}, "
                               f"groups={G2})")
    return out, torch.cat(last_states, dim=1)
