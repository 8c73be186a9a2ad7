"""``cpu`` backend of causal_conv1d: conv + bias + SiLU in one pass, in C (:file:`_cpu_kernel.c`).

fp32 CPU tensors, filters up to 16 taps. Built, cached and loaded by :mod:`visionzoo.ops._cpu_build`
(compiled on first use with the system C compiler; unavailable without one, and ``auto`` then uses
``shifted``). The output keeps ``x``'s memory layout (time-major in, time-major out).
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import _cpu_build
from .._cpu_build import buffer_like, f32c, seq, seq_reversed

OP = "causal_conv1d"
SOURCE = Path(__file__).with_name("_cpu_kernel.c")
KMAX = 16  # longest filter; must equal VZ_KMAX


class ConvArgs(ctypes.Structure):
    """One conv's arguments, the C struct ``vz_conv_args`` of :file:`_cpu_kernel.c` (same fields, order)."""

    _fields_ = ([(k, ctypes.c_int64) for k in ("batch", "dim", "length", "K")]
                + [("x", ctypes.c_void_p)] + [(f"x_s{k}", ctypes.c_int64) for k in "bdl"]
                + [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p)]
                + [("out", ctypes.c_void_p)] + [(f"o_s{k}", ctypes.c_int64) for k in "bdl"] + [("silu", ctypes.c_int64)])


class ConvBwdArgs(ctypes.Structure):
    """One conv backward's arguments, the C struct ``vz_conv_bwd_args`` (same fields, same order)."""

    _fields_ = ([(k, ctypes.c_int64) for k in ("batch", "dim", "length", "K")]
                + [("x", ctypes.c_void_p)] + [(f"x_s{k}", ctypes.c_int64) for k in "bdl"]
                + [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("silu", ctypes.c_int64)]
                + [("g", ctypes.c_void_p)] + [(f"g_s{k}", ctypes.c_int64) for k in "bdl"]
                + [("dx", ctypes.c_void_p)] + [(f"dx_s{k}", ctypes.c_int64) for k in "bdl"]
                + [("accumulate", ctypes.c_int64), ("dw", ctypes.c_void_p), ("dbias", ctypes.c_void_p)])


def _declare(lib: ctypes.CDLL) -> None:
    i64 = ctypes.c_int64
    for name, args, flags in (("vz_causal_conv1d_fwd", ConvArgs, [i64]), ("vz_causal_conv1d_bwd", ConvBwdArgs, [])):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(args), i64, i64] + flags
        fn.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether the kernel takes these inputs (``auto`` otherwise uses ``shifted``)."""
    return x.dtype == torch.float32 and weight.shape[1] <= KMAX


def _check(x: Tensor, weight: Tensor) -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError("causal_conv1d: the 'cpu' backend is unavailable (no C compiler or the build failed)")
    if not supports(x, weight):
        raise RuntimeError(f"causal_conv1d: the 'cpu' backend takes fp32 inputs and K <= {KMAX}, got "
                           f"{x.dtype} and K={weight.shape[1]}")
    return lib


def causal_conv1d_cpu_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                           out: Tensor, reverse: bool = False) -> Tensor:
    """The conv of ``x`` ``(batch, dim, L)`` written into ``out`` ``(batch, dim, L)`` fp32 (any strides).

    ``reverse=True`` convolves the time-reversed sequence (read from ``t = L - 1`` down with a negative
    time stride, no flipped copy); ``out`` is then in that reversed order. ``out`` may be ``x`` itself
    (forward order only): each step reads its input before it writes its output, channel by channel.
    """
    lib = _check(x, weight)
    batch, dim, length = x.shape
    weight, bias = f32c(weight), f32c(bias)
    run(lib, [job(batch, dim, length, seq_reversed(x) if reverse else seq(x), weight, bias, activation == "silu",
                  seq(out))], independent=True)
    return out


def job(batch: int, dim: int, length: int, x: tuple, weight: Tensor, bias: Optional[Tensor], silu: bool,
        out: tuple) -> ConvArgs:
    """One conv on raw ``(pointer, batch stride, channel stride, time stride)`` views ``x`` and ``out`` (fp32;
    element strides; a negative time stride from the last step reads or writes reversed); ``weight``
    ``(dim, K)`` or ``(dim, 1, K)`` and ``bias`` fp32 contiguous (the caller keeps them alive until
    :func:`run`)."""
    return ConvArgs(batch, dim, length, weight.shape[-1], *x, weight.data_ptr(),
                    None if bias is None else bias.data_ptr(), *out, int(silu))


def run(lib: ctypes.CDLL, jobs: list, independent: bool = False) -> None:
    """The convs ``jobs`` (same batch and dim) in one kernel call. By default channel block by channel block,
    every job's block on one thread in job order (a later job may overwrite an earlier job's input); with
    ``independent`` (no job reads another's output) job after job, the threads splitting the sequence of
    jobs (two threads, two jobs: one job per thread)."""
    if _cpu_build.run_jobs(lib.vz_causal_conv1d_fwd, jobs, int(independent)):
        raise RuntimeError(f"causal_conv1d: the 'cpu' kernel rejected K={jobs[0].K} (at most {KMAX} taps, "
                           f"jobs of one batch and dim)")


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    # x's strides when dense (time-major in, time-major out), else contiguous
    return causal_conv1d_cpu_into(x, weight, bias, activation, torch.empty_like(x))


def causal_conv1d_bidirectional_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                                    out: Tensor) -> Tensor:
    """``cat([conv(x, w[:E]), conv(flip(x), w[E:])], channels)`` with no flipped or concatenated copies.

    ``x``: ``(batch, E, L)``; ``weight``: ``(2E, K)``. The second half of the output is in the flipped time
    order (the order the backward direction of a Vim mixer works in). Writes into ``out``
    ``(batch, 2E, L)`` fp32 (any strides) and returns it.
    """
    lib = _check(x, weight)
    batch, E, length = x.shape
    weight, bias = f32c(weight), f32c(bias)
    views = (seq(x), seq_reversed(x))
    jobs = []
    for half in range(2):
        ch = slice(half * E, (half + 1) * E)
        o = out[:, ch]
        jobs.append(job(batch, E, length, views[half], weight[ch], bias[ch] if bias is not None else None,
                        activation == "silu", seq(o)))
    run(lib, jobs, independent=True)
    return out


def causal_conv1d_cpu_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, grad_out: Tensor,
                               needs, bidirectional: bool = False, dx: Optional[Tensor] = None) -> tuple:
    """``(dx, dweight, dbias)`` of :func:`causal_conv1d_cpu` (or, with ``bidirectional``, of
    :func:`causal_conv1d_bidirectional_cpu`: ``weight`` ``(2E, K)``, ``grad_out`` ``(batch, 2E, L)`` whose second
    half is in the flipped time order) in one C call; ``dx`` in ``x``'s layout, or written into the given fp32
    ``dx`` ``(batch, E, L)`` (any strides). Entries not in ``needs`` are None. The sums over batch and time of
    ``dweight`` and ``dbias`` run in one fixed order per channel (bitwise independent of the thread count)."""
    lib = _check(x, weight)
    batch, E, length = x.shape
    K = weight.shape[-1]
    w, b, g = f32c(weight.reshape(-1, K)), f32c(bias), grad_out.float()
    dx = buffer_like(x) if dx is None else dx
    dw = torch.empty(w.shape, dtype=torch.float32)
    db = torch.empty(w.shape[0], dtype=torch.float32) if bias is not None else None
    jobs = []
    for half in range(2 if bidirectional else 1):
        ch = slice(half * E, (half + 1) * E)
        gh = g[:, ch]
        jobs.append(ConvBwdArgs(batch, E, length, K, *(seq_reversed(x) if half else seq(x)), w[ch].data_ptr(),
                                None if b is None else b[ch].data_ptr(), int(activation == "silu"),
                                *seq(gh), *(seq_reversed(dx) if half else seq(dx)), half, dw[ch].data_ptr(),
                                None if db is None else db[ch].data_ptr()))
    if _cpu_build.run_jobs(lib.vz_causal_conv1d_bwd, jobs):
        raise RuntimeError(f"causal_conv1d: the 'cpu' backward kernel rejected K={K} (at most {KMAX} taps)")
    return (dx.to(x.dtype) if needs[0] else None, dw.view_as(weight).to(weight.dtype) if needs[1] else None,
            db.to(bias.dtype) if (bias is not None and needs[2]) else None)
