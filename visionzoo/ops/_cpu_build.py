"""Build, cache and load the small C kernels of :mod:`visionzoo.ops` (the ``cpu`` backends).

The kernels are plain C files (no Python or torch headers) next to the op that uses them, compiled
on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``, ~1 s each) and called
through :mod:`ctypes`. Shared libraries are cached under ``$VISIONZOO_CACHE`` (default
``~/.cache/visionzoo``) in ``kernels/``, keyed by the source, the flags, the compiler and the CPU
(``-march=native`` code must not move to another CPU), and written atomically so concurrent
processes may build at once. Without a compiler, on a failed build, or with
``VISIONZOO_CPU_KERNELS=0``, :func:`load_kernel` returns None (the reason logged once) and the ops'
``auto`` falls back to their pure-PyTorch backends.

:func:`run_items` splits a kernel's work items over ``torch.get_num_threads()`` Python threads;
ctypes releases the GIL during a foreign call, so the threads run in parallel.
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
from typing import Callable, Optional, Sequence

import torch

_logger = logging.getLogger("visionzoo.ops")
# -std=c99 alone would switch off FMA contraction (ISO mode); -ffp-contract=fast turns it back on.
FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", "-march=native", "-fno-math-errno",
         "-fno-trapping-math")

_libs: dict[str, Optional[ctypes.CDLL]] = {}
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def compiler() -> Optional[str]:
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


def cache_dir() -> Path:
    return Path(os.environ.get("VISIONZOO_CACHE", Path.home() / ".cache" / "visionzoo")) / "kernels"


def _build(source: Path, cc: str) -> Path:
    text = source.read_bytes() + Path(__file__).with_name("_simd.h").read_bytes()  # the shared header
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + cc.encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.parent.name}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, str(source), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_kernel(op: str, source: Path, declare: Callable[[ctypes.CDLL], None]) -> Optional[ctypes.CDLL]:
    """The compiled ``source`` for ``op`` with ``declare(lib)`` applied (argtypes), or None (cached)."""
    if op not in _libs:
        lib = None
        if os.environ.get("VISIONZOO_CPU_KERNELS", "1").strip() == "0":
            _logger.info("visionzoo.ops.%s: cpu kernel disabled by VISIONZOO_CPU_KERNELS=0", op)
        elif sys.platform == "win32" or (cc := compiler()) is None:
            _logger.info("visionzoo.ops.%s: no C compiler found; the 'cpu' backend is unavailable", op)
        else:
            try:
                lib = ctypes.CDLL(str(_build(source, cc)))
                declare(lib)
            except Exception as e:  # noqa: BLE001 - a failed build must not break visionzoo
                lib = None
                _logger.warning("visionzoo.ops.%s: building the cpu kernel failed (%s); using the "
                                "pure-PyTorch backend", op, e)
        _libs[op] = lib
    return _libs[op]


def forget(op: str) -> None:
    """Drop the cached library of ``op`` (tests: rebuild under another cache dir or compiler)."""
    _libs.pop(op, None)


def f32c(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x`` as contiguous fp32 for a kernel; ``x`` itself (no op dispatched) when it already is."""
    if x is None or (x.dtype == torch.float32 and x.is_contiguous()):
        return x
    return x.float().contiguous()


def ptr(x: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def run_items(fn: Callable[..., int], head: Sequence, items: int) -> list[int]:
    """Call ``fn(*head, begin, end)`` over ``[0, items)`` split across torch's intra-op thread count."""
    global _pool, _pool_size
    threads = max(1, min(torch.get_num_threads(), items))
    if threads == 1:
        return [fn(*head, 0, items)]
    if _pool is None or _pool_size != threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="visionzoo-cpu"), threads
    bounds = [items * i // threads for i in range(threads + 1)]
    futures = [_pool.submit(fn, *head, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return [f.result() for f in futures]
