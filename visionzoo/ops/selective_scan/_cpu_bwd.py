"""``cpu`` backend's backward: the selective-scan gradients in C (:file:`_cpu_bwd_kernel.c`).

Why: the ``chunked`` analytic backward runs one small PyTorch op per time step and writes the states
and ``exp(delta A)`` of every block to memory; at the Vim-Tiny size it took ~20 ms of a ~23 ms
forward+backward on one core. The kernel keeps one chunk of states per 8-channel block in cache
(recomputed from the forward's checkpoints, or from its own, a pass over the sequence) and does the
whole reverse scan in registers; (batch, group, slice) items run on ``torch.get_num_threads()`` threads. Built, cached and loaded
like the forward (:mod:`visionzoo.ops._cpu_build`) and wrapped in an opaque custom op
(``visionzoo::selective_scan_cpu_backward``, so ``torch.compile`` graphs call it). Without a
compiler, for non-fp32 or non-CPU inputs or ``N`` beyond the kernel's limit,
:func:`selective_scan_cpu_backward` returns the ``chunked`` backward's result instead.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import _cpu_build
from .._cpu_build import ptr
from ._chunked import selective_scan_chunked_backward
from ._cpu import _output, _seq, checkpoint_shape

OP = "selective_scan_bwd"
SOURCE = Path(__file__).with_name("_cpu_bwd_kernel.c")
CB = 8  # channels per block; must equal VZ_CB in the C source
NMAX = 256  # largest state size; must equal VZ_NMAX


_i64, _fp = ctypes.c_int64, ctypes.c_void_p


def _fields(name: str, prefix: str, axes: str) -> list:
    return [(name, _fp)] + [(f"{prefix}_s{k}", _i64) for k in axes]


class BwdArgs(ctypes.Structure):
    """The C struct ``vz_scan_bwd_args`` of :file:`_cpu_bwd_kernel.c` (same fields, same order)."""

    _fields_ = ([(k, _i64) for k in ("batch", "dim", "length", "dstate", "groups", "splits")]
                + _fields("u", "u", "bdl") + _fields("delta", "d", "bdl") + [("A", _fp)]
                + _fields("B", "B", "bgnl") + _fields("C", "C", "bgnl") + [("D", _fp), ("bias", _fp)]
                + _fields("z", "z", "bdl") + [("softplus", _i64)] + _fields("dout", "g", "bdl")
                + [("dlast", _fp), ("ckpt", _fp), ("ck_row", _i64)] + _fields("du", "du", "bdl")
                + _fields("ddelta", "dd", "bdl") + _fields("dz", "dz", "bdl") + _fields("dB", "dB", "sbgnl")
                + _fields("dC", "dC", "sbgnl") + [("dA", _fp), ("dD", _fp), ("dbias", _fp)])


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.vz_selective_scan_bwd
    fn.argtypes = [ctypes.POINTER(BwdArgs), _i64]
    fn.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


ITEMS = 16  # work items the backward aims for (threads share them out); not tied to the thread count


def _splits(batch: int, groups: int, dg: int) -> int:
    """Slices of a group's channel blocks per item (each slice a work item), so that there are about ITEMS.

    An item is one (batch, group) pair, or a slice of its channel blocks: at batch 1 a Vim layer has two
    pairs, which would leave threads idle. Slices cost one (batch, G, N, L) dB, dC partial sum each, summed
    in slice order. The count depends on the shapes only, never on the thread count, so the gradients are
    the same bitwise on any number of threads.
    """
    return max(1, min((dg + CB - 1) // CB, -(-ITEMS // (batch * groups))))


@torch.library.custom_op("visionzoo::selective_scan_cpu_backward", mutates_args=())
def _backward_op(
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
    checkpoints: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel as an opaque op (``torch.compile`` traces the scan's backward, and a kernel reading raw
    pointers must not be traced into). fp32 gradients of ``(u, delta, A, B, C, D, z, delta_bias)``; those
    of absent optional inputs are empty ``(0,)`` tensors (an op's outputs cannot be None)."""
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    lib = load()
    if lib is None:
        raise RuntimeError("selective_scan: the 'cpu' backward kernel is unavailable")
    f32 = torch.float32
    uf, dlf, zf, gof = (x.to(f32) if x is not None else None for x in (u, delta, z, grad_out))
    Bf, Cf = B.to(f32), C.to(f32)
    Af = A.to(f32).contiguous()
    Df = D.to(f32).contiguous() if D is not None else None
    bf = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    glf = grad_last_state.to(f32).contiguous() if grad_last_state is not None else None

    splits = _splits(batch, groups, dim // groups)
    du, ddelta = _output(u, dim), _output(u, dim)
    dz = _output(u, dim) if z is not None else None
    # dB, dC partial sums per slice, (splits, batch, G, L, N) in memory: one step's N values are contiguous.
    dBp = torch.empty(splits, batch, groups, length, dstate, dtype=f32).transpose(3, 4)
    dCp = torch.empty(splits, batch, groups, length, dstate, dtype=f32).transpose(3, 4)
    dAp = torch.empty(batch, dim, dstate, dtype=f32)
    dDp = torch.empty(batch, dim, dtype=f32) if D is not None else None
    dbp = torch.empty(batch, dim, dtype=f32) if delta_bias is not None else None
    ck = checkpoints if checkpoints is not None and checkpoints.numel() else None
    args = BwdArgs(batch, dim, length, dstate, groups, splits, *_seq(uf), *_seq(dlf), ptr(Af), *_seq(Bf), *_seq(Cf),
                   ptr(Df), ptr(bf), *_seq(zf), int(bool(delta_softplus)), *_seq(gof), ptr(glf), ptr(ck),
                   ck.shape[-1] if ck is not None else 0, *_seq(du), *_seq(ddelta), *_seq(dz), *_seq(dBp),
                   *_seq(dCp), ptr(dAp), ptr(dDp), ptr(dbp))
    status = lib.vz_selective_scan_bwd(ctypes.byref(args), _cpu_build.threads())
    if status == -2:
        raise MemoryError("selective_scan: the 'cpu' backward kernel could not allocate its scratch memory")
    if status:
        raise RuntimeError(f"selective_scan: the 'cpu' backward kernel rejected the inputs (N={dstate}, "
                           f"dim={dim}, groups={groups})")
    def empty():  # one per absent gradient: an op's outputs may not alias each other
        return torch.empty(0, dtype=f32)

    def slices_sum(parts):  # (batch, G, N, L) with (batch, G, L, N) memory, as the fake kernel says
        total = parts[0]
        for part in parts[1:]:  # in slice order, whatever the thread count
            total.add_(part)
        return total

    return (du, ddelta, dAp.sum(0), slices_sum(dBp), slices_sum(dCp), dDp.sum(0) if dDp is not None else empty(),
            dz if dz is not None else empty(), dbp.sum(0) if dbp is not None else empty())


@_backward_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, grad_last_state, checkpoints=None):
    batch, groups, dstate, length = B.shape
    dim = u.shape[1]

    def seq():
        if u.permute(2, 0, 1).is_contiguous():
            return u.new_empty((length, batch, dim), dtype=torch.float32).permute(1, 2, 0)
        return u.new_empty((batch, dim, length), dtype=torch.float32)

    def vec(x):
        return u.new_empty((dim,) if x is not None else (0,), dtype=torch.float32)

    def bc():
        return u.new_empty((batch, groups, length, dstate), dtype=torch.float32).transpose(2, 3)

    return (seq(), seq(), u.new_empty((dim, dstate), dtype=torch.float32), bc(), bc(), vec(D),
            seq() if z is not None else u.new_empty((0,), dtype=torch.float32), vec(delta_bias))


def selective_scan_cpu_backward(
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
    checkpoints: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of the selective scan, as :func:`._chunked.selective_scan_chunked_backward` returns them.

    ``grad_out``: ``(batch, dim, L)`` or None (zero); ``grad_last_state``: ``(batch, dim, N)`` or None.
    Returns the gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` with the inputs' shapes and
    dtypes (None for the optional inputs that are None). Inputs the kernel does not take (not fp32 on
    the CPU, ``N > 256``, ``L = 0``) or a missing kernel get the ``chunked`` backward. ``checkpoints``: the
    forward's states every 32 steps (``selective_scan_cpu(..., checkpoints=True)``), or None (recomputed).
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, grad_last_state)
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    if (u.device.type != "cpu" or u.dtype != torch.float32 or dstate > NMAX or dim % groups or length == 0
            or load() is None):
        return selective_scan_chunked_backward(*args)
    if checkpoints is not None and tuple(checkpoints.shape) != checkpoint_shape(batch, dim, length, dstate):
        raise ValueError(f"selective_scan: checkpoints of shape {tuple(checkpoints.shape)} do not fit a scan of "
                         f"batch {batch}, dim {dim}, L {length}, N {dstate}")
    grads = _backward_op(*args, checkpoints)
    like = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(g.to(x.dtype) if x is not None else None for g, x in zip(grads, like))
