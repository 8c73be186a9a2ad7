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
from .._cpu_build import f32c

OP = "causal_conv1d"
SOURCE = Path(__file__).with_name("_cpu_kernel.c")
CB = 8  # channels per work item; must equal VZ_CB in the C source
KMAX = 16  # longest filter; must equal VZ_KMAX


def _declare(lib: ctypes.CDLL) -> None:
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    fn = lib.vz_causal_conv1d_fwd
    fn.argtypes = [i64] * 4 + [fp, i64, i64, i64, fp, fp, ctypes.c_int32, fp, i64, i64, i64, i64, i64]
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
    sb, sd, sl = x.stride()
    xp = x.data_ptr()
    if reverse:
        xp, sl = xp + (length - 1) * sl * x.element_size(), -sl
    run(lib, batch, dim, length, (xp, sb, sd, sl), weight, bias, activation == "silu", (out.data_ptr(), *out.stride()))
    return out


def run(lib: ctypes.CDLL, batch: int, dim: int, length: int, x: tuple, weight: Tensor, bias: Optional[Tensor],
        silu: bool, out: tuple) -> None:
    """The kernel on raw ``(pointer, batch stride, channel stride, time stride)`` views ``x`` and ``out``
    (fp32; element strides; a negative time stride from the last step reads or writes reversed);
    ``weight`` ``(dim, K)`` or ``(dim, 1, K)``."""
    K = weight.shape[-1]
    head = (batch, dim, length, K, *x, f32c(weight).data_ptr(), None if bias is None else f32c(bias).data_ptr(),
            int(silu), *out)
    if any(_cpu_build.run_items(lib.vz_causal_conv1d_fwd, head, batch * ((dim + CB - 1) // CB))):
        raise RuntimeError(f"causal_conv1d: the 'cpu' kernel rejected K={K}")


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
    E = x.shape[1]
    for half in range(2):
        ch = slice(half * E, (half + 1) * E)
        causal_conv1d_cpu_into(x, weight[ch], bias[ch] if bias is not None else None, activation, out[:, ch],
                               reverse=bool(half))
    return out
