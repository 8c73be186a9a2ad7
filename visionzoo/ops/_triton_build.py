"""Load, build and compile-check the Triton kernels of :mod:`visionzoo.ops` (the ``triton`` backends).

The counterpart of :mod:`._cpu_build`. Each op keeps its kernels as plain functions in
``ops/<op>/_triton_kernel.py`` (the only modules that import Triton) and its launcher in
``ops/<op>/_triton.py``, which holds one :class:`TritonKernels` for them:

- :meth:`TritonKernels.load` imports the kernel module lazily (never at ``visionzoo`` import time); a
  missing or broken Triton makes the backend unavailable, never ``visionzoo``;
- :meth:`TritonKernels.unavailable_reason` says in one line why the kernels cannot run on a device type
  (``None`` when they can); CUDA needs only Triton, CPU tensors need Triton's interpreter
  (:func:`interpret_enabled`);
- :meth:`TritonKernels.jit` wraps a kernel with ``triton.jit`` once per device type and caches it.

:func:`compile_only` turns every launch made through :meth:`TritonKernels.jit` into an ahead-of-time
compile for GPU targets (``sm_80``, ``sm_90``) with Triton's bundled ``ptxas``, recording registers,
spills and shared memory: the launchers are then driven with CPU tensors at real model sizes and no
GPU. It needs a process in which ``TRITON_INTERPRET`` is not set (under the interpreter ``triton.jit``
returns an interpreter object that cannot be compiled). ``benchmarks/gpu_compile.py`` uses it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

_UNSET = object()

# Largest dynamic shared memory one block may use, per compute capability (A100: 163 KiB, H100: 227 KiB).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def interpret_enabled() -> bool:
    """``TRITON_INTERPRET=1`` is set, and Triton was imported under it.

    Triton wraps its own ``triton.language`` helpers (``tl.zeros``, ``tl.sum``, ...) with ``triton.jit``
    when it is imported, and that wrapping reads ``TRITON_INTERPRET``: if Triton was imported before the
    variable was set, the helpers are compiled-mode functions and the interpreter cannot run a kernel
    that uses them. (torch imports Triton early, e.g. on ``torch.library.custom_op``, so the variable
    must be in the environment before ``torch.library`` / ``visionzoo`` is imported; ``tests/conftest.py``
    sets it when there is no GPU.)
    """
    if not interpret_requested() or importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(tl.standard.zeros, InterpretedFunction)
    except Exception:  # noqa: BLE001 - a Triton without these internals: no CPU interpreter support
        return False


class TritonKernels:
    """The Triton kernels of one op: the module ``module`` (dotted name) holding plain kernel functions."""

    def __init__(self, module: str):
        self.module = module
        self._module: object = _UNSET
        self._error = ""
        self._jitted: dict[tuple[str, str], object] = {}

    def load(self):
        """The kernel module, or None when Triton cannot be imported (cached)."""
        if self._module is _UNSET:
            mod = None
            try:
                if importlib.util.find_spec("triton") is None:
                    self._error = "Triton is not installed"
                else:
                    mod = importlib.import_module(self.module)
            except Exception as exc:  # noqa: BLE001 - a broken install must not break visionzoo
                self._error = f"importing Triton failed: {type(exc).__name__}: {exc}"
                mod = None
            self._module = mod
        return self._module

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        """None when the kernels can run on ``device_type``, else why not (one line)."""
        if self.load() is None:
            return self._error or "Triton could not be imported"
        if device_type == "cuda" or (device_type == "cpu" and _session is not None):
            return None
        if device_type == "cpu":
            if interpret_enabled():
                return None
            if interpret_requested():
                return "TRITON_INTERPRET=1 was set after Triton was imported (set it before importing visionzoo)"
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported)"
        return f"no Triton kernels for device type {device_type!r}"

    def is_available(self, device_type: str) -> bool:
        return self.unavailable_reason(device_type) is None

    def jit(self, device_type: str, name: str):
        """``triton.jit`` of kernel ``name``, wrapped once per device type (CPU: the interpreter); under
        :func:`compile_only` a stand-in whose launches compile for the session's targets instead."""
        mode = "compile" if _session is not None else device_type
        fn = self._jitted.get((name, mode))
        if fn is None:
            import triton

            fn = triton.jit(getattr(self.load(), name))
            self._jitted[(name, mode)] = fn
        if _session is not None:
            return _CompileOnlyKernel(fn, _session)
        return fn


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed)


@dataclass
class CompileRecord:
    """One compiled (kernel, specialisation, options, target)."""

    kernel: str
    target: str  # e.g. "sm_90"
    case: str  # the label of the session when it was launched (model, dtype, ...)
    constexprs: dict
    dtypes: str  # the distinct pointer element types, e.g. "bf16,fp32,i32"
    num_warps: int
    num_stages: int
    shared: int = 0  # bytes of dynamic shared memory
    shared_limit: int = 0
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.shared <= self.shared_limit


@dataclass
class CompileSession:
    """What :func:`compile_only` collects. ``substitute`` ``{dtype: other}``: every launch with tensors of
    ``dtype`` is compiled a second time with those tensors as ``other`` (same sizes, strides and
    alignment), e.g. bf16 -> fp16 so that one bf16 model run also covers fp16. ``per_kernel``: compile
    at most that many distinct specialisations of each kernel (None: all)."""

    capabilities: Sequence[int]
    substitute: dict = field(default_factory=dict)
    per_kernel: Optional[int] = None
    label: str = ""
    records: list[CompileRecord] = field(default_factory=list)
    launches: int = 0  # launches seen (a specialisation already compiled counts here, not in records)
    _seen: set = field(default_factory=set)
    _per_kernel: dict = field(default_factory=dict)

    def launch(self, fn, args: tuple, kwargs: dict) -> None:
        self.launches += 1
        self._compile(fn, args, kwargs, self.label)
        for src, dst in self.substitute.items():
            if any(getattr(a, "dtype", None) == src for a in args):
                self._compile(fn, tuple(_as_dtype(a, src, dst) for a in args), kwargs,
                              f"{self.label} ({_short(src)} -> {_short(dst)})")

    def _compile(self, fn, args: tuple, kwargs: dict, label: str) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs, debug=False)
        for cap in self.capabilities:
            target = GPUTarget("cuda", cap, 32)
            backend = make_backend(target)
            # The same binding and specialisation (16-byte alignment, integers equal to 1) a launch does.
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, launch_options = binder(*args, **kwargs)
            key = (fn.__name__, str(specialization), str(launch_options))  # the same for every target
            if (key, cap) in self._seen:
                continue
            if key not in self._per_kernel.setdefault(fn.__name__, set()):
                if self.per_kernel is not None and len(self._per_kernel[fn.__name__]) >= self.per_kernel:
                    return
                self._per_kernel[fn.__name__].add(key)
            self._seen.add((key, cap))
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                                  launch_options)
            names = list(fn.arg_names)
            rec = CompileRecord(
                kernel=fn.__name__, target=f"sm_{cap}", case=label,
                constexprs={names[p[0]]: v for p, v in constexprs.items() if len(p) == 1 and fn.params[p[0]].is_constexpr},
                dtypes=",".join(sorted({t[1:] for t in signature.values() if t.startswith("*")})),
                num_warps=options.num_warps, num_stages=options.num_stages, shared_limit=SHARED_MEMORY_LIMIT.get(cap, 0),
            )
            log = io.StringIO()
            try:
                with _ptxas_log(), contextlib.redirect_stdout(log):
                    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                            options=options.__dict__)
                if "cubin" not in kernel.asm:
                    raise RuntimeError("no cubin produced")
                rec.shared = int(kernel.metadata.shared)
                _parse_ptxas(log.getvalue(), rec)
            except Exception as exc:  # noqa: BLE001 - recorded; the caller reports every failure
                lines = str(exc).strip().splitlines()
                rec.error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
            self.records.append(rec)


def _short(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_dtype(x, src, dst):
    """``x`` (a tensor of dtype ``src``) as an uninitialised ``dst`` tensor with its sizes, strides and
    storage offset (hence its alignment; the element sizes must match); anything else unchanged."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dtype != src:
        return x
    if src.itemsize != dst.itemsize:
        raise ValueError(f"cannot substitute {src} by {dst}: element sizes differ")
    base = torch.empty(x.untyped_storage().nbytes() // dst.itemsize, dtype=dst, device=x.device)
    return base.as_strided(x.shape, x.stride(), x.storage_offset())


class _CompileOnlyKernel:
    """Stands in for a jitted kernel under :func:`compile_only`: ``kernel[grid](*args)`` compiles."""

    def __init__(self, fn, session: CompileSession):
        self.fn, self.session = fn, session

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.session.launch(self.fn, args, kwargs)


_session: Optional[CompileSession] = None


@contextlib.contextmanager
def compile_only(capabilities: Sequence[int] = (80, 90), substitute: Optional[dict] = None,
                 per_kernel: Optional[int] = None) -> Iterator[CompileSession]:
    """Within the block, Triton launches compile for ``cuda`` targets ``capabilities`` instead of running.

    Kernels may then be "launched" with CPU tensors (their outputs stay uninitialised; launchers that
    choose by device type see ``"cuda"``, :func:`launch_device_type`). The yielded :class:`CompileSession`
    collects one :class:`CompileRecord` per distinct specialisation and target.
    """
    global _session
    if interpret_enabled() or interpret_requested():
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1 (Triton must compile, not "
                           "interpret); run it with TRITON_INTERPRET unset")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("compile_only needs Triton")
    if _session is not None:
        raise RuntimeError("compile_only blocks do not nest")
    _session = CompileSession(tuple(capabilities), dict(substitute or {}), per_kernel)
    try:
        yield _session
    finally:
        _session = None


def launch_device_type(x) -> str:
    """The device type a launcher should configure its kernel for: ``x``'s, or ``"cuda"`` while
    :func:`compile_only` compiles CPU-driven launches for GPU targets."""
    return "cuda" if _session is not None else x.device.type


@contextlib.contextmanager
def _ptxas_log():
    """Compile afresh (no cache hit, so ptxas runs) and have Triton print ptxas' ``-v`` report."""
    from triton import knobs

    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def _parse_ptxas(log: str, rec: CompileRecord) -> None:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError("ptxas -v report not found")
    rec.registers = int(regs.group(1))
    rec.stack, rec.spill_stores, rec.spill_loads = (int(g) for g in spills.groups())
