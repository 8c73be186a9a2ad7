"""``cpu`` backend: a selective-scan forward in C (:file:`_cpu_kernel.c`) for fp32 CPU tensors.

Why: the ``chunked`` backend is bound by per-op dispatch and by writing ``exp(delta A)`` and the
states to memory (~5 ms per Vim-Tiny layer on one core, see ``benchmarks/selective_scan_cpu.md``);
a loop that keeps the state in registers and never leaves the core does the same work in about half
of that. Built, cached and loaded by :mod:`visionzoo.ops._cpu_build` (compiled on first use with the
system C compiler; unavailable without one, and ``auto`` then uses ``chunked``).

The backward is a C reverse scan too (:mod:`._cpu_bwd`: states recomputed per chunk from checkpoints,
which the forward can hand over: ``checkpoints=True``); without its kernel it is the ``chunked`` analytic
backward.

Threads: a kernel call takes a list of jobs (:class:`ScanArgs`, one per scan direction, same batch and
channels) and splits (batch element, channel block) items over ``torch.get_num_threads()`` OpenMP
threads (:mod:`.._cpu_build`): every job of an item on the same thread in job order when later jobs
depend on earlier ones (the bidirectional scan accumulates its second direction into the first's output),
or job after job when they are independent (the fused mixer: with two threads, one direction each). So batch
1 uses every thread too, and the output is bitwise the same for any thread count.
"""
from __future__ import annotations

import ctypes
import logging
import math
import sys
import threading
import weakref
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import _cpu_build
from .._cpu_build import NULL_SEQ, f32c, ptr
from .._cpu_build import seq as _seq
from .._cpu_build import seq_reversed as _seq_reversed
from ..causal_conv1d import _cpu as _conv
from ..causal_conv1d._cpu import ConvArgs
from ._chunked import LOG2E

OP = "selective_scan"
_logger = logging.getLogger("visionzoo.ops")
SOURCE = Path(__file__).with_name("_cpu_kernel.c")
NMAX = 256  # largest state size; must equal VZ_NMAX
SUPPORTED_DTYPES = (torch.float32,)


_i64, _fp = ctypes.c_int64, ctypes.c_void_p


def _seq_fields(name: str, s: str) -> list:
    return [(name, _fp), (f"{s}_sb", _i64), (f"{s}_sd", _i64), (f"{s}_sl", _i64)]


def _bc_fields(name: str) -> list:
    return [(name, _fp)] + [(f"{name}_s{k}", _i64) for k in "bgnl"]


class ScanArgs(ctypes.Structure):
    """One scan's arguments, the C struct ``vz_scan_args`` of :file:`_cpu_kernel.c` (same fields, same
    order). Sequences are ``(pointer, batch stride, channel stride, time stride)`` in elements."""

    _fields_ = ([(k, _i64) for k in ("batch", "dim", "length", "dstate", "groups")] + _seq_fields("u", "u")
                + _seq_fields("delta", "d") + [("dt_w", _fp), ("rank", _i64), ("A2", _fp), ("a_log", _i64)]
                + _bc_fields("B") + _bc_fields("C") + [("D", _fp), ("bias", _fp)] + _seq_fields("z", "z")
                + [("softplus", _i64)] + _seq_fields("out", "o")
                + [("last_state", _fp), ("ckpt", _fp), ("ck_row", _i64), ("out_scale", ctypes.c_float),
                   ("accumulate", ctypes.c_int32), ("gate_total", ctypes.c_int32)])


def _job(batch: int, dim: int, length: int, dstate: int, groups: int, u: tuple, delta: tuple, dt_w, rank: int,
         A2, a_log: bool, B: tuple, C: tuple, D, bias, z: tuple, softplus: bool, out: tuple, last_state,
         scale: float = 1.0, accumulate: bool = False, ckpt=None, ck_row: int = 0,
         gate_total: bool = False) -> ScanArgs:
    """The one place the kernel's arguments are put together: sequences as (pointer, 3 strides), ``B, C`` as
    (pointer, 4 strides), the rest pointers (ints, or None for NULL) and flags. ``gate_total``: the gate
    ``silu(z)`` multiplies the accumulated output (both directions' sum) instead of this job's part."""
    return ScanArgs(batch, dim, length, dstate, groups, *u, *delta, dt_w, rank, A2, int(a_log), *B, *C, D, bias,
                    *z, int(softplus), *out, last_state, ckpt, ck_row, scale, int(accumulate), int(gate_total))


class LinearArgs(ctypes.Structure):
    """The C struct ``vz_linear_args``: ``out[b, t] = w @ u[b, t]`` over rows (unit strides along k and m), ``w``
    given as :func:`packed_transpose` of it."""

    _fields_ = ([(k, _i64) for k in ("batch", "rows", "K", "M")] + [("u", _fp), ("u_sb", _i64), ("u_sl", _i64),
                                                                    ("wt", _fp), ("wt_ld", _i64), ("out", _fp),
                                                                    ("o_sb", _i64), ("o_sl", _i64)])


class GateArgs(ctypes.Structure):
    """The C struct ``vz_gate_args``: ``out = (a + b) * silu(z)`` over ``(batch, rows, dim)``, each a
    ``(pointer, batch stride, row stride)`` view with unit stride along dim."""

    _fields_ = ([(k, _i64) for k in ("batch", "rows", "dim")]
                + [f for name in ("a", "b", "z", "out") for f in ((name, _fp), (f"{name[0]}_sb", _i64),
                                                                  (f"{name[0]}_sl", _i64))])


def _run(lib: ctypes.CDLL, jobs: list, what: str) -> None:
    """The scans ``jobs`` in one call, channel block by channel block, every job's block on one thread in job
    order (a later job may accumulate into an earlier one's output)."""
    if _cpu_build.run_jobs(lib.vz_selective_scan_fwd, jobs):
        a = jobs[0]
        raise RuntimeError(f"{what}: the 'cpu' kernel rejected the inputs (N={a.dstate}, dim={a.dim}, "
                           f"groups={a.groups}, rank={a.rank})")


def _declare(lib: ctypes.CDLL) -> None:
    lib.vz_selective_scan_fwd.argtypes = [ctypes.POINTER(ScanArgs), _i64, _i64]
    lib.vz_mixer.argtypes = [ctypes.POINTER(ConvArgs), ctypes.POINTER(LinearArgs), ctypes.POINTER(ScanArgs), _i64,
                             _i64, ctypes.POINTER(GateArgs), _i64]
    lib.vz_vim_blocks.argtypes = [ctypes.POINTER(VimBlockArgs), _i64, _fp, _fp, _fp, _i64]
    for fn in (lib.vz_selective_scan_fwd, lib.vz_mixer, lib.vz_vim_blocks):
        fn.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


def is_available(device_type: str) -> bool:
    return device_type == "cpu" and load() is not None


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
    from ._op import output_strides  # the one rule for the scan's output layout (_op imports this module)

    return torch.empty_strided((u.shape[0], channels, u.shape[2]), output_strides(u, channels), dtype=torch.float32)


CHUNK = 32  # steps per state checkpoint; must equal VZ_BT in both C sources


def checkpoint_shape(batch: int, dim: int, length: int, dstate: int) -> tuple[int, int, int, int]:
    """The forward's state checkpoints: ``(batch, chunks, N, dim)`` fp32, the state before every CHUNK-th step."""
    return (batch, -(-length // CHUNK), dstate, dim)


def _checkpoints(batch: int, dim: int, length: int, dstate: int) -> Tensor:
    return torch.empty(checkpoint_shape(batch, dim, length, dstate), dtype=torch.float32)


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
    checkpoints: bool = False,
):
    """Selective scan on validated fp32 CPU inputs (``B, C`` as ``(batch, G, N, L)``).

    Returns ``out`` ``(batch, dim, L)`` (time-major strides when ``u`` is a time-major view, else
    contiguous) and ``last_state`` ``(batch, dim, N)`` fp32; with ``checkpoints``, also the states the
    backward starts its chunks from (:func:`._cpu_bwd.checkpoint_shape`; pass them to
    :func:`._cpu_bwd.selective_scan_cpu_backward` and it skips recomputing them).
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    lib = _library_for(dstate)
    u, delta, z = (x.float() if x is not None else None for x in (u, delta, z))  # the kernel reads fp32 only
    A2, D, bias = _per_channel(A, D, delta_bias)
    B, C = B.float(), C.float()
    out = _output(u, dim)
    last_state = torch.empty(batch, dim, dstate, dtype=torch.float32)
    ck = _checkpoints(batch, dim, length, dstate) if checkpoints else None
    _run(lib, [_job(batch, dim, length, dstate, groups, _seq(u), _seq(delta), None, 0, ptr(A2), False, _seq(B),
                    _seq(C), ptr(D), ptr(bias), _seq(z), delta_softplus, _seq(out), ptr(last_state), ckpt=ptr(ck),
                    ck_row=dim)],
         "selective_scan")
    if checkpoints:
        return out, last_state, ck
    return out, last_state


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
    checkpoints: bool = False,
    out: Optional[Tensor] = None,
    dt_w: Optional[Tensor] = None,
):
    """Both directions of a Vim mixer with no flipped copies (the layout of ``reversed_inputs=True``).

    ``u, delta``: ``(batch, 2E, L)``, channels ``[E, 2E)`` (the backward direction) already time-reversed,
    as are groups ``[G/2, G)`` of ``B, C`` ``(batch, G, N, L)``; ``z``: None or ``(batch, E, L)`` shared,
    in the original order. The forward direction writes ``s * out_f`` (``s`` = 1/2 for ``reduce="mean"``,
    1 for ``"sum"``); the backward direction then walks ``z`` and the output from ``t = L - 1`` down
    (negative time strides) and adds ``s * out_b`` in place. ``reduce="none"`` writes the backward
    direction (back in the original order) as channels ``[E, 2E)`` instead.

    Returns ``out`` (``(batch, E, L)``, or ``(batch, 2E, L)`` for ``"none"``; time-major when ``u`` is) and
    ``last_state`` ``(batch, 2E, N)`` (the backward direction's after its last step, ``t = 0``); with
    ``checkpoints``, also the stacked scan's state checkpoints for :func:`._cpu_bwd.selective_scan_cpu_backward`
    (the stacked scan being the one ``reversed_inputs=True`` describes: the backward half in its reversed order).
    ``out``: an fp32 buffer of the output's shape (any strides) to write into, instead of a new one. ``dt_w``:
    ``(2E, R)``, with ``delta`` then the low-rank factors ``(batch, 2, R, L)`` of the two directions' deltas,
    ``delta[:, c] = dt_w[c] @ delta_lowrank[:, direction]`` (Mamba's ``dt_proj`` folded into the scan).
    """
    batch, dim2, length = u.shape
    E, G2, dstate = dim2 // 2, B.shape[1] // 2, B.shape[2]
    lib = _library_for(dstate)
    u, delta, z = (x.float() if x is not None else None for x in (u, delta, z))  # the kernel reads fp32 only
    A2, D, bias = _per_channel(A, D, delta_bias)
    out = _output(u, dim2 if reduce == "none" else E) if out is None else out
    B, C = B.float(), C.float()
    last_states = [torch.empty(batch, E, dstate, dtype=torch.float32) for _ in range(2)]
    scale = 0.5 if reduce == "mean" else 1.0
    ck = _checkpoints(batch, dim2, length, dstate) if checkpoints else None
    rank = 0 if dt_w is None else dt_w.shape[1]
    dtw = None if dt_w is None else f32c(dt_w)
    jobs = []
    for direction, ch in enumerate((slice(0, E), slice(E, dim2))):
        grp = slice(direction * G2, (direction + 1) * G2)
        backward = direction == 1
        o = out[:, ch] if reduce == "none" else out
        seq = _seq_reversed if backward else _seq
        summed = reduce != "none"  # then the shared gate multiplies the sum, once, in the second job
        zj = z if backward or not summed else None
        dl = _seq(delta[:, direction] if rank else delta[:, ch])
        jobs.append(_job(batch, E, length, dstate, G2, _seq(u[:, ch]), dl, ptr(dtw[ch]) if rank else None, rank,
                         ptr(A2[ch]), False, _seq(B[:, grp]), _seq(C[:, grp]), ptr(D[ch] if D is not None else None),
                         ptr(bias[ch] if bias is not None else None), seq(zj), delta_softplus, seq(o),
                         ptr(last_states[direction]), scale, backward and summed,
                         ck.data_ptr() + 4 * ch.start if checkpoints else None, dim2, backward and summed))
    _run(lib, jobs, "selective_scan")  # item by item, the backward direction after the forward one
    if checkpoints:
        return out, torch.cat(last_states, dim=1), ck
    return out, torch.cat(last_states, dim=1)


class MixerDirection(NamedTuple):
    """One direction's weights of a (bi)Mamba mixer, as its modules hold them (fp32)."""

    conv_weight: Tensor  # (E, K), or nn.Conv1d's (E, 1, K)
    conv_bias: Optional[Tensor]  # (E,)
    x_proj_weight: Tensor  # (R + 2N, E)
    dt_proj_weight: Tensor  # (E, R)
    dt_proj_bias: Tensor  # (E,)
    A_log: Tensor  # (E, N): A = -exp(A_log), Mamba's parameterisation
    D: Tensor  # (E,)


_PACKED: dict[int, tuple] = {}  # id(weight) -> (its version, pointer and shape, packed copy)


def packed_transpose(w: Tensor) -> Tensor:
    """``w`` ``(M, K)`` as the C Linear takes it: fp32 ``(K, M')``, ``M'`` = M rounded up to 16 (whole vectors of
    any build), zero past M. Cached per weight tensor (dropped when the weight is freed) and rebuilt when it
    is changed in place (its version counter) or its storage or shape changes."""
    key = (w._version, w.data_ptr(), tuple(w.shape))
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0] == key:
        return hit[1]
    M, K = w.shape
    wt = torch.zeros(K, -(-M // 16) * 16, dtype=torch.float32)
    wt[:, :M] = w.detach().t()
    if hit is None:
        weakref.finalize(w, _PACKED.pop, id(w), None)
    _PACKED[id(w)] = (key, wt)
    return wt


_WORKSPACE = threading.local()


def _workspace(*shapes) -> list:
    """fp32 buffers of these shapes, the same memory call after call on this thread (grown when too small):
    the fused mixer's per-layer scratch stays in the core's caches from one layer to the next, where new
    memory at every call cost the conv ~30% more (first writes to lines no cache held)."""
    last = getattr(_WORKSPACE, "last", None)  # (shapes, views) of the previous call: layers repeat shapes
    if last is not None and last[0] == shapes:
        return last[1]
    sizes = [math.prod(s) for s in shapes]
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < sum(sizes):
        buf = _WORKSPACE.buf = torch.empty(sum(sizes), dtype=torch.float32)
    views = [t.view(s) for t, s in zip(buf[:sum(sizes)].split(sizes), shapes)]
    _WORKSPACE.last = (shapes, views)
    return views


def _mixer_jobs(xz: tuple, batch: int, length: int, E: int, ws: tuple, u: Tensor, x_dbl: Tensor,
                threads: int) -> tuple:
    """The arguments of ``vz_mixer`` for a Vim mixer on the in-projection ``xz``, a raw ``(pointer, batch stride,
    row stride)`` view of ``(batch, L, 2E)`` fp32 rows (unit stride along channels), whose x half receives the
    output; ``ws``: both directions' fp32 contiguous weights (:class:`MixerDirection` order, alive until the
    call); ``u`` ``(2, batch, L, E)`` and ``x_dbl`` ``(2, batch, L, R + 2N)``: scratch memory. Returns
    ``(convs, x-projections, scans, gate pass or None, independent)``, the keep-alive packed weights last."""
    x0, x_sb, x_sl = xz
    N, R = ws[0][5].shape[-1], ws[0][3].shape[-1]
    M = R + 2 * N
    last = (length - 1) * x_sl * 4
    x_fwd, x_rev = (x0, x_sb, 1, x_sl), (x0 + last, x_sb, 1, -x_sl)
    # Per direction k: u[k] the conv output (k = 1 in the time-reversed order), then the scan's output in its
    # place; x_dbl[k] the x-projection, (dt, B, C) per row.
    u0, xd0 = u.data_ptr(), x_dbl.data_ptr()
    u_views = [(u0 + 4 * k * batch * length * E, length * E, 1, E) for k in range(2)]
    xd_ptrs = [xd0 + 4 * k * batch * length * M for k in range(2)]
    convs = [_conv.job(batch, E, length, x_view, w[0], w[1], True, u_view)
             for x_view, w, u_view in zip((x_fwd, x_rev), ws, u_views)]
    wts = [packed_transpose(w[2]) for w in ws]
    lin = [LinearArgs(batch, length, E, M, u_views[k][0], length * E, E, wt.data_ptr(), wt.shape[1], xd_ptrs[k],
                      length * M, M) for k, wt in enumerate(wts)]
    # The x-projections, the scans, then (y_f / 2 + y_b / 2) * silu(z) over the x half of xz, the backward
    # direction read time-reversed. On one thread the backward scan adds its half into the forward one's output
    # and applies the gate as it goes (no gate pass); on several, each scan writes over its own input and the gate
    # pass sums them. The same operations in the same order: bitwise the same result.
    one_thread = threads == 1
    z_rev = (x0 + 4 * E + last, x_sb, 1, -x_sl)
    scans = []
    for k, w in enumerate(ws):
        _, _, _, dt_w, dt_b, A_log, D = w
        p, sb = xd_ptrs[k], length * M
        out = (x_rev if k else x_fwd) if one_thread else u_views[k]
        gate = one_thread and k == 1
        scans.append(_job(batch, E, length, N, 1, u_views[k], (p, sb, 1, M), dt_w.data_ptr(), R, A_log.data_ptr(),
                          True, (p + 4 * R, sb, 0, 1, M), (p + 4 * (R + N), sb, 0, 1, M), D.data_ptr(),
                          dt_b.data_ptr(), z_rev if gate else NULL_SEQ, True, out, None, 0.5, gate, gate_total=gate))
    gate_pass = None if one_thread else GateArgs(
        batch, length, E, u0, length * E, E, u_views[1][0] + 4 * (length - 1) * E, length * E, -E, x0 + 4 * E,
        x_sb, x_sl, x0, x_sb, x_sl)
    return convs, lin, scans, gate_pass, int(not one_thread), wts


def _weights(d: MixerDirection) -> list:
    return [f32c(t) for t in d]


def bimamba_inner_cpu(xz: Tensor, forward: MixerDirection, backward: MixerDirection) -> Tensor:
    """Inference (no autograd) of a Vim mixer between its in- and out-projections, on fp32 CPU tensors.

    ``xz``: the in-projection ``(batch, L, 2E)`` (x, then the gate z). Returns
    ``(y_f + flip(y_b)) / 2 * silu(z)`` ``(batch, L, E)``, written over the x half of ``xz`` (a view of
    it; ``xz`` is consumed).

    Same arithmetic as the differentiable path, in less memory and with one C call (``vz_mixer``), one parallel
    region of four stages: both directions' convs (the backward one reads x time-reversed in place), both
    x-projections, both scans (``dt_proj`` folded in: no ``(L, E)`` delta; dt, B and C read in place from the
    x-projection's rows) and the shared gate over the sum. The directions are independent jobs until the
    gate: with two threads each direction runs whole on one thread, reading only what that thread wrote (with
    the channels split instead, each core re-read and overwrote lines the other had just written). At
    Vim-Tiny 1024x1024 the mixer holds ~25 MiB instead of ~55 MiB, and at 224 it saves the dispatch of ~25
    small ops.
    """
    batch, length, E2 = xz.shape
    E, N, R = E2 // 2, forward.A_log.shape[-1], forward.dt_proj_weight.shape[-1]
    lib = _library_for(N)
    xz = f32c(xz)
    u, x_dbl = _workspace((2, batch, length, E), (2, batch, length, R + 2 * N))
    ws = (_weights(forward), _weights(backward))  # fp32 contiguous weights, alive until the call
    threads = _cpu_build.threads()
    convs, lin, scans, gate, independent, _ = _mixer_jobs((xz.data_ptr(), xz.stride(0), xz.stride(1)), batch,
                                                          length, E, ws, u, x_dbl, threads)
    if lib.vz_mixer(_array(convs), _array(lin), _array(scans), 2, independent, gate, threads):
        raise RuntimeError(f"bimamba_inner_cpu: the 'cpu' kernel rejected the inputs (N={N}, E={E}, R={R})")
    return xz[..., :E]


def _array(structs: list):
    return (type(structs[0]) * len(structs))(*structs)


# ---------------------------------------------------------------------------------------------- a whole Vim block
class VimBlockArgs(ctypes.Structure):
    """The C struct ``vz_vim_block_args``: a Vim block's weights, scratch memory and mixer jobs, all but its input
    and output (same fields, same order)."""

    _fields_ = ([(k, _i64) for k in ("rows", "dim", "inner")] + [("norm_w", _fp), ("eps", ctypes.c_float)]
                + [(k, _fp) for k in ("in_w", "out_w", "h", "xz", "proj")]
                + [("conv", ConvArgs * 2), ("lin", LinearArgs * 2), ("scan", ScanArgs * 2), ("gate", GateArgs),
                   ("use_gate", _i64), ("independent", _i64), ("gemm", _fp)])


class TorchBlas(NamedTuple):
    """MKL's packed GEMM in torch's own CPU library (``cblas_sgemm_pack_get_size``, ``cblas_sgemm_pack``,
    ``cblas_sgemm_compute``)."""

    pack_size: ctypes._CFuncPtr
    pack: ctypes._CFuncPtr
    compute: ctypes._CFuncPtr


_CB_ROW_MAJOR, _CB_NO_TRANS, _CB_TRANS, _CB_PACKED, _CB_B_MATRIX = 101, 111, 112, 151, 162  # CBLAS enums
_BLAS: list = []  # [TorchBlas or None], found once


def torch_blas() -> Optional[TorchBlas]:
    """MKL's packed GEMM from torch's own CPU library, or None where this torch build has none or it does not give
    ``F.linear``'s product (checked once on a small product, within fp32 rounding: bitwise on the Xeon this was
    written on, while on an AMD Zen 5 MKL's packed and unpacked kernels round some shapes differently)."""
    if not _BLAS:
        _BLAS.append(_find_blas())
    return _BLAS[0]


def _find_blas() -> Optional[TorchBlas]:
    name = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}.get(sys.platform)
    c_int, p = ctypes.c_int, ctypes.c_void_p
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name)) if name else None
        blas = None if lib is None else TorchBlas(lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack,
                                                   lib.cblas_sgemm_compute)
    except (OSError, AttributeError):
        blas = None
    if blas is None:
        _logger.info("visionzoo.ops.selective_scan: no MKL packed GEMM in torch's library; Vim blocks run op by op")
        return None
    blas.pack_size.restype = ctypes.c_size_t
    blas.pack_size.argtypes = [c_int] * 4
    blas.pack.argtypes = [c_int] * 6 + [ctypes.c_float, p, c_int, p]
    blas.compute.argtypes = [c_int] * 6 + [p, c_int, p, c_int, ctypes.c_float, p, c_int]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 24, generator=g), torch.randn(40, 24, generator=g)
    out, packed = torch.empty(37, 40), pack_weight(w, 37, blas)
    blas.compute(_CB_ROW_MAJOR, _CB_NO_TRANS, _CB_PACKED, 37, 40, 24, x.data_ptr(), 24, packed.data_ptr(), 24, 0.0,
                 out.data_ptr(), 40)
    with torch.autocast("cpu", enabled=False):  # the fp32 Linear, whatever context asks first
        expected = torch.nn.functional.linear(x, w)
    if not torch.allclose(out, expected, rtol=1e-5, atol=1e-5):
        _logger.info("visionzoo.ops.selective_scan: MKL's packed GEMM does not give torch's Linear product; Vim "
                     "blocks run op by op")
        return None
    return blas


def pack_weight(w: Tensor, rows: int, blas: Optional[TorchBlas] = None) -> Tensor:
    """``w`` ``(M, K)`` packed by MKL as the right operand of ``x @ w.T`` for ``x`` of ``rows`` rows (a buffer of
    :func:`torch_blas`'s format: about the size of ``w``)."""
    blas = blas or torch_blas()
    M, K = w.shape
    w = f32c(w.detach())
    buf = torch.empty(-(-blas.pack_size(_CB_B_MATRIX, rows, M, K) // 4), dtype=torch.float32)
    blas.pack(_CB_ROW_MAJOR, _CB_B_MATRIX, _CB_TRANS, rows, M, K, 1.0, w.data_ptr(), K, buf.data_ptr())
    return buf


class VimBlockWeights(NamedTuple):
    """A Vim block's weights for :func:`vim_blocks_cpu` (fp32)."""

    norm_weight: Tensor  # (D,)
    eps: float
    in_proj_weight: Tensor  # (2E, D)
    out_proj_weight: Tensor  # (D, E)
    forward: MixerDirection
    backward: MixerDirection


def _version_key(tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # owner -> its last plan (see vim_blocks_cpu)


def vim_blocks_cpu(x: Tensor, layers: Sequence[VimBlockWeights], owner: object) -> Tensor:
    """Vim blocks for inference on fp32 CPU tensors, ``x <- x + out_proj(mixer(in_proj(rms_norm(x))))`` for each of
    ``layers`` in turn, in one C call (``vz_vim_blocks``): the RMSNorm kernel, MKL's packed GEMM for the
    projections (:func:`torch_blas`, torch's own, on weights packed once: ``nn.Linear``'s product, bitwise on the
    Xeon this was written on, within the last bit on an AMD Zen 5, whose MKL rounds some shapes differently; the
    packed copies take about as much memory as the projection weights), the fused mixer of
    :func:`bimamba_inner_cpu`, and the residual add. ``x``: ``(batch, L, D)``; returns a new tensor (what the
    blocks give op by op, within that rounding).

    ``owner``: what the call's arguments are cached for (the model or block; weakly held, so copies and pickles
    of it carry nothing). The arguments, all but ``x`` and the output (weight pointers, the mixers' jobs on this
    thread's scratch memory), are built once per input size, thread count and weight version and reused: inside
    a model's forward the Python that built them per call cost more than the norm, the conv and the residual add
    together.
    """
    batch, length, D = x.shape
    if batch * length == 0:  # nothing to compute (an empty batch)
        return torch.empty(x.shape, dtype=torch.float32)
    threads = _cpu_build.threads()
    first = layers[0].forward
    E, N, R = first.A_log.shape[0], first.A_log.shape[-1], first.dt_proj_weight.shape[-1]
    rows = batch * length
    bufs = _workspace((rows, D), (rows, 2 * E), (rows, D), (rows, D), (2, batch, length, E),
                      (2, batch, length, R + 2 * N))
    key = (tuple(x.shape), threads, bufs[0].data_ptr(), tuple(w.eps for w in layers),
           _version_key([t for w in layers
                         for t in (w.norm_weight, w.in_proj_weight, w.out_proj_weight, *w.forward, *w.backward)]))
    plan = _PLANS.get(owner)
    if plan is None or plan[0] != key:
        built = [_block_plan(batch, length, D, w, bufs, threads) for w in layers]
        plan = _PLANS[owner] = (key, (VimBlockArgs * len(built))(*(b[0] for b in built)), built)
    x = f32c(x)
    out = torch.empty_like(x)
    if _library_for(N).vz_vim_blocks(plan[1], len(layers), x.data_ptr(), out.data_ptr(), bufs[3].data_ptr(),
                                     threads):
        raise RuntimeError(f"vim_blocks_cpu: the 'cpu' kernel rejected the inputs (D={D}, E={E}, N={N}, R={R})")
    return out


def _block_plan(batch: int, length: int, D: int, weights: VimBlockWeights, bufs: list, threads: int) -> tuple:
    """``(VimBlockArgs, tensors it points to)`` of one layer for :func:`vim_blocks_cpu`."""
    h, xz, proj, _, u, x_dbl = bufs
    E = u.shape[-1]
    fwd = weights.forward
    if fwd.A_log.shape[0] != E or fwd.dt_proj_weight.shape[-1] + 2 * fwd.A_log.shape[-1] != x_dbl.shape[-1]:
        raise ValueError("vim_blocks_cpu: every layer must have the first one's E, N and R")
    shapes = tuple(tuple(t.shape) for t in (weights.norm_weight, weights.in_proj_weight, weights.out_proj_weight))
    if shapes != ((D,), (2 * E, D), (D, E)):
        raise ValueError(f"vim_blocks_cpu: norm, in_proj and out_proj weights of shapes {shapes}; expected "
                         f"({D},), ({2 * E}, {D}), ({D}, {E}) for D={D}, E={E}")
    ws = (_weights(weights.forward), _weights(weights.backward))
    norm_w = f32c(weights.norm_weight)
    in_w, out_w = (pack_weight(t, batch * length) for t in (weights.in_proj_weight, weights.out_proj_weight))
    convs, lin, scans, gate, independent, wts = _mixer_jobs((xz.data_ptr(), length * 2 * E, 2 * E), batch, length,
                                                            E, ws, u, x_dbl, threads)
    args = VimBlockArgs(batch * length, D, E, norm_w.data_ptr(), weights.eps, in_w.data_ptr(), out_w.data_ptr(),
                        h.data_ptr(), xz.data_ptr(), proj.data_ptr(), _array(convs), _array(lin), _array(scans),
                        gate if gate is not None else GateArgs(), int(gate is not None), independent,
                        ctypes.cast(torch_blas().compute, ctypes.c_void_p).value)
    return args, (ws, norm_w, in_w, out_w, wts)
