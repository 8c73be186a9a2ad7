"""Sparsifiner's key selection in one C pass per query row (:file:`_keys_cpu_kernel.c`), CPU fp32.

Given each row's kept predictor coefficients (``cols`` ascending, ``weights``) and the thresholded
basis as a table of rows, the kernel sums the ``T`` basis rows of a query row into its ``N`` scores
(fused multiply-adds in ascending basis order: the dense ``coef @ basis`` product's order, whose other
terms are exact zeros), finds the ``K``-th largest score with a histogram plus a quickselect inside one
bucket, and writes the kept indices in ascending order. The ``(B, H, N - 1, N)`` score tensor, the
``topk`` over it and its outputs never exist: every row lives in L1. Where scores tie at the ``K``-th
value it keeps the lowest indices, the rule of :func:`.top_indices` (the ``torch`` backend) and of ONNX ``TopK``.

Built and loaded by :mod:`visionzoo.ops._cpu_build` (system C compiler, first use); unavailable without
one (callers then use ``embedding_bag`` + ``topk``). Rows are split over ``torch.get_num_threads()``
threads in C (``vz_parallel``, :mod:`.._cpu_build`); each row is one thread's, so the result does not
depend on the thread count.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import _cpu_build
from .._cpu_build import ptr

OP = "sparsifiner_keys"
SOURCE = Path(__file__).with_name("_keys_cpu_kernel.c")
NMAX = 8192  # must equal VZ_NMAX in the C source


def _declare(lib: ctypes.CDLL) -> None:
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    fn = lib.vz_sparsifiner_keys
    fn.argtypes = [i64, i64, i64, fp, fp, fp, fp, i64, i64]
    fn.restype = ctypes.c_int


def load() -> Optional[ctypes.CDLL]:
    return _cpu_build.load_kernel(OP, SOURCE, _declare)


def supports(table: Tensor) -> bool:
    return table.device.type == "cpu" and table.dtype == torch.float32 and table.shape[-1] <= NMAX


def kept_keys_cpu(cols: Tensor, weights: Tensor, table: Tensor, budget: int) -> Optional[Tensor]:
    """``cols`` ``(..., T)`` int64 rows of ``table`` ``(R, N)`` (ascending per row), ``weights`` ``(..., T)``
    -> the ``budget`` highest-scoring key indices ``(..., budget)`` (int64, ascending), or None when
    the kernel is unavailable or does not take these inputs."""
    lib = load()
    if lib is None or not supports(table) or weights.dtype != torch.float32:
        return None
    T, N = cols.shape[-1], table.shape[-1]
    cols, weights, table = cols.contiguous(), weights.contiguous(), table.contiguous()
    rows = cols.numel() // T
    out = torch.empty(*cols.shape[:-1], budget, dtype=torch.int64)
    if rows == 0:
        return out
    if lib.vz_sparsifiner_keys(T, N, budget, ptr(cols), ptr(weights), ptr(table), ptr(out), rows,
                               _cpu_build.threads()):
        raise RuntimeError(f"sparsifiner key selection: the cpu kernel rejected its inputs (NaN/inf scores or "
                           f"N={N} > {NMAX})")
    return out
