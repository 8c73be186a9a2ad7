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
from .._cpu_build import buffer_like, ptr
from ._chunked import selective_scan_chunked_backward
from ._cpu import _output, _seq, _seq_reversed, checkpoint_shape

OP = "selective_scan_bwd"
SOURCE = Path(__file__).with_name("_cpu_bwd_kernel.c")
NMAX = 256  # largest state size; must equal VZ_NMAX


_i64, _fp = ctypes.c_int64, ctypes.c_void_p


def _fields(name: str, prefix: str, axes: str) -> list:
    return [(name, _fp)] + [(f"{prefix}_s{k}", _i64) for k in axes]


class BwdArgs(ctypes.Structure):
    """The C struct ``vz_scan_bwd_args`` of :file:`_cpu_bwd_kernel.c` (same fields, same order)."""

    _fields_ = ([(k, _i64) for k in ("batch", "dim", "length", "dstate", "groups", "splits")]
                + _fields("u", "u", "bdl") + _fields("delta", "d", "bdl") + [("dt_w", _fp), ("rank", _i64), ("A", _fp)]
                + _fields("B", "B", "bgnl") + _fields("C", "C", "bgnl") + [("D", _fp), ("bias", _fp)]
                + _fields("z", "z", "bdl") + [("softplus", _i64)] + _fields("dout", "g", "bdl")
                + [("dlast", _fp), ("ckpt", _fp), ("ck_row", _i64)] + _fields("du", "du", "bdl")
                + _fields("ddelta", "dd", "bdl") + _fields("dz", "dz", "bdl") + _fields("dB", "dB", "sbgnl")
                + _fields("dC", "dC", "sbgnl") + [("dA", _fp), ("dD", _fp), ("dbias", _fp)])


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.vz_selective_scan_bwd
    fn.argtypes = [ctypes.POINTER(BwdArgs), _i64]
    fn.restype = ctypes.c_int
    lib.vz_scan_bwd_lanes.argtypes = []
    lib.vz_scan_bwd_lanes.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


ITEMS = 16  # work items the backward aims for (threads share them out); not tied to the thread count


def _splits(batch: int, groups: int, dg: int) -> int:
    """Slices of a group's channel blocks per item (each slice a work item), so that there are about ITEMS.

    An item is one (batch, group) pair, or a slice of its channel blocks (of 16 channels where the kernel is
    built for AVX-512, else 8: ``vz_scan_bwd_lanes``): at batch 1 a Vim layer has two pairs, which would leave
    threads idle. Slices cost one (batch, G, N, L) dB, dC partial sum each, summed in slice order. The count
    depends on the shapes (and the build) only, never on the thread count, so the gradients are the same
    bitwise on any number of threads.
    """
    lanes = _kernel().vz_scan_bwd_lanes()
    return max(1, min((dg + lanes - 1) // lanes, -(-ITEMS // (batch * groups))))


def _kernel() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("selective_scan: the 'cpu' backward kernel is unavailable")
    return lib


def _takes(u: Tensor, dim: int, groups: int, dstate: int) -> bool:
    """Whether the kernel takes a scan of ``dim`` channels in ``groups`` groups over ``u``'s steps."""
    return (u.device.type == "cpu" and u.dtype == torch.float32 and dstate <= NMAX and dim % groups == 0
            and u.shape[-1] > 0 and load() is not None)


def _call(lib: ctypes.CDLL, args: BwdArgs) -> None:
    status = lib.vz_selective_scan_bwd(ctypes.byref(args), _cpu_build.threads())
    if status == -2:
        raise MemoryError("selective_scan: the 'cpu' backward kernel could not allocate its scratch memory")
    if status:
        raise RuntimeError(f"selective_scan: the 'cpu' backward kernel rejected the inputs (N={args.dstate}, "
                           f"dim={args.dim}, groups={args.groups})")


def _empty() -> Tensor:  # one per absent gradient: an op's outputs may not alias each other
    return torch.empty(0, dtype=torch.float32)


def _slices_sum(parts: Tensor) -> Tensor:
    """The dB / dC partial sums of the slices, summed in slice order (whatever the thread count)."""
    total = parts[0]
    for part in parts[1:]:
        total.add_(part)
    return total


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
    lib = _kernel()
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
    args = BwdArgs(batch, dim, length, dstate, groups, splits, *_seq(uf), *_seq(dlf), None, 0, ptr(Af), *_seq(Bf),
                   *_seq(Cf),
                   ptr(Df), ptr(bf), *_seq(zf), int(bool(delta_softplus)), *_seq(gof), ptr(glf), ptr(ck),
                   ck.shape[-1] if ck is not None else 0, *_seq(du), *_seq(ddelta), *_seq(dz), *_seq(dBp),
                   *_seq(dCp), ptr(dAp), ptr(dDp), ptr(dbp))
    _call(lib, args)
    return (du, ddelta, dAp.sum(0), _slices_sum(dBp), _slices_sum(dCp), dDp.sum(0) if dDp is not None else _empty(),
            dz if dz is not None else _empty(), dbp.sum(0) if dbp is not None else _empty())


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
    if not _takes(u, dim, groups, dstate):
        return selective_scan_chunked_backward(*args)
    if checkpoints is not None and tuple(checkpoints.shape) != checkpoint_shape(batch, dim, length, dstate):
        raise ValueError(f"selective_scan: checkpoints of shape {tuple(checkpoints.shape)} do not fit a scan of "
                         f"batch {batch}, dim {dim}, L {length}, N {dstate}")
    grads = _backward_op(*args, checkpoints)
    like = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(g.to(x.dtype) if x is not None else None for g, x in zip(grads, like))


def bidirectional_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                           z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                           grad_out: Optional[Tensor], scale: float, grad_last_state: Optional[Tensor],
                           checkpoints: Optional[Tensor] = None, du: Optional[Tensor] = None,
                           ddelta: Optional[Tensor] = None, dz: Optional[Tensor] = None,
                           dt_w: Optional[Tensor] = None) -> tuple:
    """The body of :func:`_bidirectional_backward_op`. ``du``, ``ddelta`` (fp32 ``(batch, 2E, L)``) and ``dz``
    (``(batch, E, L)``; any strides): buffers to write those gradients into, instead of new ones in ``u``'s
    layout. ``dt_w``: ``(2E, R)`` fp32, with ``delta`` the low-rank factors ``(batch, 2, R, L)`` of the two
    directions (``dt_proj`` folded in, as :func:`._cpu.selective_scan_bidirectional_cpu` takes them); ``ddelta``
    is still the gradient of the ``(batch, 2E, L)`` delta."""
    batch, dim2, length = u.shape
    E, G2, dstate = dim2 // 2, B.shape[1] // 2, B.shape[2]
    lib = _kernel()
    f32 = torch.float32
    uf, dlf, zf = (x.to(f32) if x is not None else None for x in (u, delta, z))
    gof = None if grad_out is None else (grad_out.to(f32) * scale if scale != 1.0 else grad_out.to(f32))
    Bf, Cf, Af = B.to(f32), C.to(f32), A.to(f32).contiguous()
    Df = D.to(f32).contiguous() if D is not None else None
    bf = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    ck = checkpoints if checkpoints is not None and checkpoints.numel() else None
    rank = 0 if dt_w is None else dt_w.shape[1]
    dtw = None if dt_w is None else dt_w.to(f32).contiguous()

    splits = _splits(batch, G2, E // G2)
    du = _output(u, dim2) if du is None else du
    ddelta = _output(u, dim2) if ddelta is None else ddelta
    if z is None:
        dz = None
    else:  # the second direction's part is added into the first's: in the same layout
        dz = [_output(u, E), _output(u, E)] if dz is None else [dz, buffer_like(dz)]
    dBp = torch.empty(splits, batch, 2 * G2, length, dstate, dtype=f32).transpose(3, 4)
    dCp = torch.empty(splits, batch, 2 * G2, length, dstate, dtype=f32).transpose(3, 4)
    dAp = [torch.empty(batch, E, dstate, dtype=f32) for _ in range(2)]
    dDp = [torch.empty(batch, E, dtype=f32) for _ in range(2)] if D is not None else None
    dbp = [torch.empty(batch, E, dtype=f32) for _ in range(2)] if delta_bias is not None else None
    for half in range(2):
        ch, grp = slice(half * E, (half + 1) * E), slice(half * G2, (half + 1) * G2)
        seq = _seq_reversed if half else _seq  # the original-order tensors, walked in this direction's time
        glf = grad_last_state[:, ch].to(f32).contiguous() if grad_last_state is not None else None
        args = BwdArgs(batch, E, length, dstate, G2, splits, *_seq(uf[:, ch]),
                       *_seq(dlf[:, half] if rank else dlf[:, ch]), ptr(dtw[ch] if rank else None), rank, ptr(Af[ch]),
                       *_seq(Bf[:, grp]), *_seq(Cf[:, grp]), ptr(Df[ch] if Df is not None else None),
                       ptr(bf[ch] if bf is not None else None), *seq(zf), int(bool(delta_softplus)), *seq(gof),
                       ptr(glf), ck.data_ptr() + 4 * E * half if ck is not None else None,
                       ck.shape[-1] if ck is not None else 0, *_seq(du[:, ch]), *_seq(ddelta[:, ch]),
                       *seq(dz[half] if dz is not None else None), *_seq(dBp[:, :, grp]), *_seq(dCp[:, :, grp]),
                       ptr(dAp[half]), ptr(dDp[half] if dDp is not None else None),
                       ptr(dbp[half] if dbp is not None else None))
        _call(lib, args)

    def per_channel(parts):
        return torch.cat([parts[0].sum(0), parts[1].sum(0)]) if parts is not None else _empty()

    return (du, ddelta, per_channel(dAp), _slices_sum(dBp), _slices_sum(dCp), per_channel(dDp),
            dz[0].add_(dz[1]) if dz is not None else _empty(), per_channel(dbp))


@torch.library.custom_op("visionzoo::selective_scan_bidirectional_cpu_backward", mutates_args=())
def _bidirectional_backward_op(
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
    scale: float,
    grad_last_state: Optional[Tensor],
    checkpoints: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of Vim's bidirectional scan in its own layout, one kernel call per direction, no copies.

    ``u, delta`` ``(batch, 2E, L)`` and ``B, C`` ``(batch, 2G, N, L)`` with the backward direction (channels
    ``[E, 2E)``, groups ``[G, 2G)``) time-reversed, as the forward took them (``reversed_inputs=True``); ``z``
    ``(batch, E, L)`` the shared gate and ``grad_out`` ``(batch, E, L)`` the gradient of
    ``scale * (y_f + flip(y_b))``, both in the original order: the backward direction's call reads them
    backwards in place (negative time strides) and writes its ``dz`` part backwards into a second buffer.
    ``checkpoints``: the stacked forward's (``selective_scan_bidirectional_cpu(..., checkpoints=True)``), or
    None. Returns the fp32 gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` in the stacked layout
    (empty ``(0,)`` for absent optional inputs)."""
    return bidirectional_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, scale,
                                  grad_last_state, checkpoints)


@_bidirectional_backward_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, scale, grad_last_state, checkpoints=None):
    grads = list(_backward_op(u, delta, A, B, C, D, None, delta_bias, delta_softplus, None, None, None))
    return (*grads[:6], _output(u, u.shape[1] // 2) if z is not None else _empty(), grads[7])


def selective_scan_bidirectional_cpu_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                              D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                                              delta_softplus: bool, grad_out: Optional[Tensor], scale: float,
                                              grad_last_state: Optional[Tensor],
                                              checkpoints: Optional[Tensor] = None) -> Optional[tuple]:
    """Gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` of the bidirectional scan in Vim's layout (see
    :func:`_bidirectional_backward_op`), in the inputs' dtypes (None for absent optional inputs); None when the
    kernel does not take these inputs (the caller then runs the stacked backward)."""
    if not _takes(u, u.shape[1] // 2, B.shape[1] // 2, B.shape[2]):
        return None
    grads = _bidirectional_backward_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_out, scale,
                                       grad_last_state, checkpoints)
    like = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(g.to(x.dtype) if x is not None else None for g, x in zip(grads, like))
