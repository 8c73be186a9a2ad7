"""``triton`` backend: the selective scan's forward and backward written in Triton.

One program per (batch element, group, block of ``BLOCK_D`` channels of that group) loops over the
sequence with the state ``(BLOCK_D, N)`` in fp32 registers (kernels in :mod:`._triton_kernel`). Inputs
may be fp32, fp16 or bf16 (math in fp32), with any strides; ``out`` is in ``u``'s dtype (time-major
when ``u`` is a time-major view, otherwise contiguous) and ``last_state`` is fp32 ``(batch, dim, N)``,
as for the ``chunked`` backend.

The backward kernel recomputes the states: a forward pass keeps the state every ``CHUNK`` (16) steps,
then each chunk, last to first, is recomputed into a per-program scratch buffer of ``CHUNK + 1`` states
and walked backwards with the adjoint. Extra memory: ``cdiv(L, CHUNK) + CHUNK + 1`` states per program
(about ``batch * dim * N * (L / 16 + 17)`` floats), never ``(batch, dim, L, N)``. The gradients of the
parameters shared across programs are written as per-program partial sums and reduced by torch here
(deterministic; no atomics): ``dA``, ``dD``, ``d delta_bias`` per batch element, ``dB``, ``dC`` per
(batch element, group, channel block).

Both kernels also run the backward-in-time direction of :func:`..selective_scan_bidirectional` (groups
``>= g_fwd`` are scanned from ``t = L - 1`` down to ``0`` by indexing; see :mod:`._triton_kernel`).

Triton is imported lazily (never at ``visionzoo`` import time) and any failure to import it makes the
backend unavailable. It runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` is
set in the environment before Triton is first imported (Triton's interpreter; slow, meant for tests;
see :func:`interpret_enabled`). Loading and ``triton.jit`` wrapping are :mod:`.._triton_build`'s.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._triton_build import TritonKernels, cdiv, interpret_enabled, next_pow2  # noqa: F401 - re-exported

KERNELS = TritonKernels(__package__ + "._triton_kernel")
load = KERNELS.load
is_available = KERNELS.is_available
unavailable_reason = KERNELS.unavailable_reason
_kernel = KERNELS.jit  # (device_type, name); module attribute so tests can count launches

# Input dtypes the kernel handles (fp64 runs on ``chunked``, see ``_op.resolve``).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(u: Tensor) -> None:
    if not is_available(u.device.type):
        raise RuntimeError(f"selective_scan: backend 'triton' is not available on device type {u.device.type!r}")
    if u.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"selective_scan: backend 'triton' does not support dtype {u.dtype}")


def _block_d(block_d: Optional[int], dg: int, block_n: int, budget: int) -> int:
    """Channels per program: a power of two, at most the group size (rounded up), ~budget state elements."""
    if block_d is None:
        block_d = max(1, min(next_pow2(dg), max(16, budget // block_n)))
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError("block_d must be a power of two")
    return min(block_d, next_pow2(dg))


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
    g_fwd: Optional[int] = None,
    in_rev: bool = True,
    z_rev: bool = True,
    z_shift: int = 0,
) -> tuple[Tensor, Tensor]:
    """Selective scan on validated inputs (``B, C`` as ``(batch, G, N, L)``); returns ``(out, last_state)``.

    ``g_fwd``: groups ``>= g_fwd`` are scanned backwards in time (default ``G``: none; see
    :mod:`._triton_kernel`): their output is written time-reversed, their inputs are read time-reversed
    when ``in_rev`` (else they are taken as already reversed), their ``z`` when ``z_rev``.
    ``z_shift``: the reversed channels ``c`` read channel ``c - z_shift`` of ``z``.
    """
    _check(u)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    dg = dim // groups
    if u.permute(2, 0, 1).is_contiguous():
        out = torch.empty((length, batch, dim), dtype=u.dtype, device=u.device).permute(1, 2, 0)
    else:
        out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, dstate), dtype=torch.float32, device=u.device)

    block_n = next_pow2(dstate)
    block_d = _block_d(block_d, dg, block_n, 1024)
    zz = z if z is not None else u
    grid = (batch, groups, cdiv(dg, block_d))
    _kernel(u.device.type, "selective_scan_fwd_kernel")[grid](
        u, delta, A, B, C,
        D if D is not None else u, zz, delta_bias if delta_bias is not None else u,
        out, last_state,
        length, dstate, dg, groups if g_fwd is None else g_fwd, z_shift,
        *u.stride(), *delta.stride(), *zz.stride(), *out.stride(),
        *A.stride(), *B.stride(), *C.stride(), *last_state.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), IN_REV=bool(in_rev), Z_REV=bool(z_rev), BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=4,
    )
    return out, last_state


# Steps per checkpoint chunk of the backward (memory: cdiv(L, CHUNK) + CHUNK + 1 states per program).
CHUNK = 16


def selective_scan_triton_backward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    grad_out: Optional[Tensor],
    grad_last_state: Optional[Tensor],
    *,
    block_d: Optional[int] = None,
    chunk: int = CHUNK,
    g_fwd: Optional[int] = None,
    in_rev: bool = True,
    z_rev: bool = True,
    z_shift: int = 0,
    dout_shift: int = 0,
    dout_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`selective_scan_triton` (``u, delta, A, B, C, D, z, delta_bias``).

    ``grad_out`` ``(batch, dim, L)`` (or, with ``dout_shift``, the reversed channels ``c`` read its channel
    ``c - dout_shift``; every value is multiplied by ``dout_scale``) or None; ``grad_last_state``
    ``(batch, dim, N)`` or None. ``g_fwd, in_rev, z_rev, z_shift`` as in the forward; with ``z_shift > 0``
    the returned ``dz`` has ``dim`` (stacked) channels, one per scanned channel, and the caller folds the
    halves.
    Gradients come back in the inputs' dtypes (``u, delta, z`` with ``u``'s strides when it is time-major).
    """
    _check(u)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    dg = dim // groups
    block_n = next_pow2(dstate)
    block_d = _block_d(block_d, dg, block_n, 512)
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    nblk = cdiv(dg, block_d)
    nchunks = cdiv(length, chunk)
    nprog = batch * groups * nblk
    dev = u.device
    f32 = torch.float32

    def seq_like(x: Tensor) -> Tensor:  # (batch, dim, L) gradient buffer in u's layout
        if u.permute(2, 0, 1).is_contiguous():
            return torch.empty((length, batch, dim), dtype=x.dtype, device=dev).permute(1, 2, 0)
        return torch.empty((batch, dim, length), dtype=x.dtype, device=dev)

    du = seq_like(u)
    ddelta = seq_like(delta)
    dz = seq_like(z) if z is not None else None
    dA = torch.empty((batch, dim, dstate), dtype=f32, device=dev)
    dB = torch.empty((batch, groups, nblk, block_n, length), dtype=f32, device=dev)
    dC = torch.empty((batch, groups, nblk, block_n, length), dtype=f32, device=dev)
    dD = torch.empty((batch, dim), dtype=f32, device=dev) if D is not None else None
    dbias = torch.empty((batch, dim), dtype=f32, device=dev) if delta_bias is not None else None
    ckpt = torch.empty((nprog, nchunks, block_d, block_n), dtype=f32, device=dev)
    scratch = torch.empty((nprog, chunk + 1, block_d, block_n), dtype=f32, device=dev)

    zz = z if z is not None else u
    dzz = dz if dz is not None else du
    do = grad_out if grad_out is not None else u
    dl = grad_last_state if grad_last_state is not None else dA
    grid = (batch, groups, nblk)
    _kernel(dev.type, "selective_scan_bwd_kernel")[grid](
        u, delta, A, B, C,
        D if D is not None else u, zz, delta_bias if delta_bias is not None else u, do, dl,
        du, ddelta, dzz, dA, dB, dC,
        dD if dD is not None else dA, dbias if dbias is not None else dA, ckpt, scratch,
        length, dstate, dg, groups if g_fwd is None else g_fwd, z_shift, dout_shift, float(dout_scale),
        dim, nblk, nchunks,
        *u.stride(), *delta.stride(), *zz.stride(), *do.stride(),
        *du.stride(), *ddelta.stride(), *dzz.stride(),
        *A.stride(), *B.stride(), *C.stride(), *dl.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_DOUT=grad_out is not None, HAS_DLAST=grad_last_state is not None,
        IN_REV=bool(in_rev), Z_REV=bool(z_rev),
        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
        num_warps=4,
    )
    # Partial sums over programs -> the parameters' shapes.
    grad_A = dA.sum(0).to(A.dtype)
    grad_B = dB[:, :, :, :dstate].sum(2).to(B.dtype)
    grad_C = dC[:, :, :, :dstate].sum(2).to(C.dtype)
    grad_D = dD.sum(0).to(D.dtype) if dD is not None else None
    grad_bias = dbias.sum(0).to(delta_bias.dtype) if dbias is not None else None
    return du, ddelta, grad_A, grad_B, grad_C, grad_D, dz, grad_bias

