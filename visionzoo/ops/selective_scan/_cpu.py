"""``cpu`` backend: a selective-scan forward in C, compiled on first use, for fp32 CPU tensors.

Why: the ``chunked`` backend is bound by per-op dispatch and by writing ``exp(delta A)`` and the
states to memory (~5 ms per Vim-Tiny layer on one core, see ``benchmarks/selective_scan_cpu.md``);
a loop that keeps the state in registers and never leaves the core does the same work in a fraction
of that. The kernel (:file:`_cpu_kernel.c`) is plain C with no Python or torch headers, so it
compiles in about a second with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) and is
called through :mod:`ctypes`. The shared library is cached under ``$VISIONZOO_CACHE`` (default
``~/.cache/visionzoo``), keyed by the source, the flags, the compiler and the CPU, and written
atomically. When no compiler is found or the build fails, the backend is unavailable (logged once)
and ``auto`` uses ``chunked``; ``VISIONZOO_CPU_KERNELS=0`` disables it.

Threads: work items (batch element x block of 16 channels) are split across ``torch.get_num_threads()``
Python threads; ctypes releases the GIL during the call, so they run in parallel.

The backward is the ``chunked`` analytic backward (states recomputed from block checkpoints), so
training gives the same gradients as with ``chunked``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ._chunked import LOG2E

_logger = logging.getLogger("visionzoo.ops")
_SOURCE = Path(__file__).with_name("_cpu_kernel.c")
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
CB = 16  # channels per work item; must equal VZ_CB in the C source
NMAX = 256  # largest state size; must equal VZ_NMAX
SUPPORTED_DTYPES = (torch.float32,)

_UNSET = object()
_lib: object = _UNSET
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """Something that changes when ``-march=native`` would generate different code."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += line
    except OSError:
        pass
    return ident


def _cache_dir() -> Path:
    return Path(os.environ.get("VISIONZOO_CACHE", Path.home() / ".cache" / "visionzoo")) / "kernels"


def _build(cc: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + cc.encode() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"selective_scan_cpu_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, str(_SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build by another process is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load():
    """The compiled library, or None when it cannot be built here (cached; the reason is logged once)."""
    global _lib
    if _lib is _UNSET:
        _lib = None
        if os.environ.get("VISIONZOO_CPU_KERNELS", "1").strip() == "0":
            _logger.info("visionzoo.ops.selective_scan: cpu kernel disabled by VISIONZOO_CPU_KERNELS=0")
        elif sys.platform == "win32" or (cc := _compiler()) is None:
            _logger.info("visionzoo.ops.selective_scan: no C compiler found; the 'cpu' backend is unavailable")
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                fn = lib.vz_selective_scan_fwd
                i64, fp = ctypes.c_int64, ctypes.c_void_p
                fn.argtypes = ([i64] * 5 + [fp, i64, i64, i64] * 2 + [fp] * 5 + [fp, i64, i64, i64]
                               + [ctypes.c_int32] + [fp, i64, i64, i64] + [fp, i64, i64])
                fn.restype = ctypes.c_int
                _lib = lib
            except Exception as e:  # noqa: BLE001 - a failed build must not break visionzoo
                _logger.warning("visionzoo.ops.selective_scan: building the cpu kernel failed (%s); "
                                "using the chunked backend", e)
    return _lib


def is_available(device_type: str) -> bool:
    return device_type == "cpu" and load() is not None


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="visionzoo-scan"), n
    return _pool


def _ptr(x: Optional[Tensor]):
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def _seq(x: Optional[Tensor]) -> tuple:
    """Pointer and strides of a ``(batch, dim, L)`` fp32 tensor (any strides), or NULL."""
    if x is None:
        return (None, 0, 0, 0)
    return (_ptr(x), *x.stride())


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
    lib = load()
    if lib is None:
        raise RuntimeError("selective_scan: the 'cpu' backend is unavailable (no C compiler or the build failed)")
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], B.shape[2]
    if dstate > NMAX:
        raise RuntimeError(f"selective_scan: the 'cpu' backend supports N <= {NMAX}, got {dstate}")
    f32 = torch.float32
    u, delta = u.to(f32), delta.to(f32)
    z = z.to(f32) if z is not None else None
    A2 = (A.to(f32) * LOG2E).contiguous()
    Bt = B.to(f32).transpose(2, 3).contiguous()  # (batch, G, L, N)
    Ct = C.to(f32).transpose(2, 3).contiguous()
    D = D.to(f32).contiguous() if D is not None else None
    bias = delta_bias.to(f32).contiguous() if delta_bias is not None else None
    if u.permute(2, 0, 1).is_contiguous():  # time-major (L, batch, dim) in memory: keep it for out
        out = torch.empty(length, batch, dim, dtype=f32).permute(1, 2, 0)
    else:
        out = torch.empty(batch, dim, length, dtype=f32)
    last_state = torch.empty(batch, dim, dstate, dtype=f32)

    items = batch * ((dim + CB - 1) // CB)
    head = (batch, dim, length, dstate, groups, *_seq(u), *_seq(delta), _ptr(A2), _ptr(Bt), _ptr(Ct),
            _ptr(D), _ptr(bias), *_seq(z), int(bool(delta_softplus)), *_seq(out), _ptr(last_state))
    threads = max(1, min(torch.get_num_threads(), items))
    if threads == 1:
        codes = [lib.vz_selective_scan_fwd(*head, 0, items)]
    else:
        bounds = [items * i // threads for i in range(threads + 1)]
        futures = [_executor(threads).submit(lib.vz_selective_scan_fwd, *head, lo, hi)
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        codes = [f.result() for f in futures]
    if any(codes):
        raise RuntimeError(f"selective_scan: the 'cpu' kernel rejected the inputs (N={dstate}, dim={dim}, "
                           f"groups={groups})")
    return out, last_state
