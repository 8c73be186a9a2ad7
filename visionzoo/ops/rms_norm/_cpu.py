"""``cpu`` backend of rms_norm: one C pass per row (:file:`_cpu_kernel.c`), for fp32 CPU inference.

Built, cached and loaded by :mod:`visionzoo.ops._cpu_build` (compiled on first use; unavailable without a
C compiler, and ``auto`` then uses ``reference``). Rows are split over torch's intra-op threads, each row
computed whole by one thread (bitwise the same output for any thread count).
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import _cpu_build

OP = "rms_norm"
SOURCE = Path(__file__).with_name("_cpu_kernel.c")
_i64, _fp = ctypes.c_int64, ctypes.c_void_p


class NormArgs(ctypes.Structure):
    """The C struct ``vz_norm_args`` (same fields, same order)."""

    _fields_ = [("rows", _i64), ("dim", _i64), ("x", _fp), ("x_sr", _i64), ("w", _fp), ("out", _fp),
                ("o_sr", _i64), ("eps", ctypes.c_float), ("out_bf16", ctypes.c_int32)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.vz_rms_norm.argtypes = [ctypes.POINTER(NormArgs), _i64]
    lib.vz_rms_norm.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


def unavailable(device_type: str) -> Optional[str]:
    return None if load() is not None else "no C compiler, VISIONZOO_CPU_KERNELS=0, or the build failed"


def rms_norm_cpu(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """RMSNorm of fp32 CPU ``x`` over its last dimension, no autograd; a new contiguous tensor of ``out_dtype``
    (default fp32; bf16 is rounded in the kernel, bitwise as ``.to(torch.bfloat16)`` of the fp32 result)."""
    lib = load()
    if lib is None:
        raise RuntimeError("rms_norm: the 'cpu' backend is unavailable (no C compiler or the build failed)")
    D = x.shape[-1]
    x = x.contiguous()
    w = weight.float().contiguous() if weight is not None else None
    bf16 = out_dtype == torch.bfloat16
    out = torch.empty(x.shape, dtype=torch.bfloat16 if bf16 else torch.float32)
    rows = x.numel() // D if D else 0
    if rows:
        lib.vz_rms_norm(NormArgs(rows, D, x.data_ptr(), D, None if w is None else w.data_ptr(), out.data_ptr(), D,
                                 eps, int(bf16)), _cpu_build.threads())
    return out if out_dtype is None or bf16 else out.to(out_dtype)
