"""Build, cache and load the small C kernels of :mod:`visionzoo.ops` (the ``cpu`` backends).

The kernels are plain C files (no Python or torch headers) next to the op that uses them, compiled
on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``, ~1 s each) and called
through :mod:`ctypes`. Shared libraries are cached under ``$VISIONZOO_CACHE`` (default
``~/.cache/visionzoo``) in ``kernels/``, keyed by the source, the flags, the compiler and the CPU
(``-march=native`` code must not move to another CPU), and written atomically so concurrent
processes may build at once. Without a compiler, on a failed build, or with
``VISIONZOO_CPU_KERNELS=0``, :func:`load_kernel` returns None (the reason logged once) and the ops'
``auto`` falls back to their pure-PyTorch backends.

Threads: every kernel takes ``torch.get_num_threads()`` (:func:`threads`) as its last argument and splits
its work items over that many threads itself (``vz_parallel`` in ``_simd.h``), with OpenMP: built with
``-fopenmp``, the libraries link ``libgomp.so.1``, which in a torch process is torch's own (same soname,
already loaded), so the kernels run on torch's intra-op thread pool, as its own ops do. Where
``-fopenmp`` does not build (a compiler without OpenMP), the kernels are built without it and run on the
calling thread. Every output element is computed whole by one thread in a fixed order: results do not
depend on the thread count. ctypes releases the GIL during the call.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

_logger = logging.getLogger("visionzoo.ops")
# -std=c99 alone would switch off FMA contraction (ISO mode); -ffp-contract=fast turns it back on.
FLAGS = ("-O3", "-std=c99", "-ffp-contract=fast", "-fPIC", "-shared", "-march=native", "-fno-math-errno",
         "-fno-trapping-math")
OPENMP = ("-fopenmp",)

_libs: dict[str, Optional[ctypes.CDLL]] = {}


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
    """The cached library of ``source``: built with OpenMP, or, where that fails, without."""
    try:
        return _build_with(source, cc, FLAGS + OPENMP)
    except RuntimeError as e:
        _logger.info("visionzoo.ops: building %s with OpenMP failed; single-threaded kernels (%s)", source.name,
                     str(e).splitlines()[0])
        return _build_with(source, cc, FLAGS)


_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def _source_text(source: Path, seen: Optional[set] = None) -> bytes:
    """``source`` followed by every local file it includes (``#include "..."``, recursively, each once): what the
    cache key hashes, so that a change to the shared header or to an included kernel rebuilds the library."""
    seen = set() if seen is None else seen
    source = source.resolve()
    if source in seen:
        return b""
    seen.add(source)
    text = source.read_bytes()
    return text + b"".join(_source_text(source.parent / name.decode(), seen) for name in _INCLUDE.findall(text))


def _build_with(source: Path, cc: str, flags: tuple) -> Path:
    text = _source_text(source)
    key = hashlib.sha256(text + " ".join(flags).encode() + cc.encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.parent.name}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(source), "-o", tmp]
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


NULL_SEQ = (None, 0, 0, 0)


def buffer_like(x: torch.Tensor, channels: Optional[int] = None) -> torch.Tensor:
    """An fp32 ``(batch, channels, L)`` buffer (``channels`` defaults to ``x``'s) in ``x``'s layout: ``(batch, L,
    channels)`` memory where ``x``'s channels are contiguous (Vim's time-major views), else contiguous."""
    batch, dim, length = x.shape
    channels = dim if channels is None else channels
    if x.stride(1) == 1:
        return torch.empty(batch, length, channels, dtype=torch.float32).transpose(1, 2)
    return torch.empty(batch, channels, length, dtype=torch.float32)


def seq(x: Optional[torch.Tensor]) -> tuple:
    """A kernel's strided view of ``x`` (fp32, any strides): ``(pointer, *strides)`` in elements, or a NULL
    ``(batch, dim, L)`` sequence for None."""
    return NULL_SEQ if x is None else (x.data_ptr(), *x.stride())


def seq_reversed(x: Optional[torch.Tensor]) -> tuple:
    """The strided view that walks a ``(batch, dim, L)`` tensor from ``t = L - 1`` down to 0 (the time-reversed
    sequence, no flipped copy): a pointer to the last step and a negative time stride."""
    if x is None:
        return NULL_SEQ
    sb, sd, sl = x.stride()
    return (x.data_ptr() + (x.shape[-1] - 1) * sl * x.element_size(), sb, sd, -sl)


def ptr(x: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    return ctypes.c_void_p(x.data_ptr()) if x is not None else None


def threads() -> int:
    """The thread count every kernel is called with: torch's intra-op threads."""
    return max(1, torch.get_num_threads())


def run_jobs(fn: Callable[..., int], jobs: Sequence[ctypes.Structure], *flags: int) -> int:
    """``fn(jobs array, len(jobs), threads(), *flags)`` for a kernel taking an array of argument structs; its
    status."""
    return fn((type(jobs[0]) * len(jobs))(*jobs), len(jobs), threads(), *flags)
