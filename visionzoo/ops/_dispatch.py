"""The op contract shared by every op in :mod:`visionzoo.ops`: backends, selection, fail-safe, aten paths.

Every op declares itself once (an :class:`OpDecl` in its ``_op.py``): its backends, each a
:class:`Backend` that says *why* it cannot run (``available(device_type)`` for what the install lacks,
``can_run(x, **facts)`` for the inputs it does not take, plus its ``devices`` and ``dtypes``), and the
order ``auto`` tries them in per device type. One function, :meth:`OpDecl.dispatch`, then runs a call:

* ``backend="auto"`` (the default) can be overridden per op with ``VISIONZOO_BACKEND_<OP>`` (e.g.
  ``VISIONZOO_BACKEND_SELECTIVE_SCAN=chunked``);
* a backend asked for by name that cannot run stops with one line,
  ``"<op>: backend 'x' cannot run here: <reason>"``; one named by the environment variable stops so when
  it cannot run on the device at all, and leaves inputs it does not take (a dtype, a size) to ``auto``;
* ``auto`` walks the order and logs, once per (op, device, dtype), at INFO which backend runs and at
  DEBUG why each earlier one was skipped (``VISIONZOO_LOG=debug`` shows both, see :func:`configure_logging`);
* a backend marked ``fallible`` (the hand-written Triton kernels) that raises on its first use while
  ``auto`` chose it logs one warning, is marked unusable for that (op, device, dtype) and the call reruns
  on the next backend; once it has run, its errors propagate, and a forced backend always raises;
* while tracing (``torch.jit.trace``, ``torch.export`` / dynamo, FakeTensor, ONNX export, see
  :func:`tracing`) no backend marked ``native`` (a C kernel called through ctypes) runs: ``auto`` skips
  it and a forced one gives way to the first traceable backend of the order.

Exporters replace each custom op by plain aten ops: :func:`register_aten_path` records an op's
decomposition (its reference or chunked algorithm), :func:`decompositions` returns them all, and under
:func:`aten_only` the public entries call those paths directly instead of the custom ops.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch

_logger = logging.getLogger("visionzoo.ops")
T = TypeVar("T")
Reason = Optional[str]

_DECLARED: dict = {}  # op name -> OpDecl, filled as each op's _op.py is imported
_logged: set = set()
_broken: set = set()  # (op, backend, device type, dtype): fallible backends that failed on first use
_proven: set = set()  # (op, backend, device type, dtype): fallible backends that have run once
_local = threading.local()


def configure_logging(value: Optional[str] = None) -> None:
    """``VISIONZOO_LOG=debug|info|warning`` sets the level of the ``visionzoo`` logger and gives it a
    stderr handler (read once when :mod:`visionzoo` is imported; a no-op when the variable is unset)."""
    value = (os.environ.get("VISIONZOO_LOG", "") if value is None else value).strip().upper()
    if not value:
        return
    level = logging.getLevelName(value)
    if not isinstance(level, int):
        raise ValueError(f"VISIONZOO_LOG: unknown level {value.lower()!r}; use debug, info, warning or error")
    root = logging.getLogger("visionzoo")
    root.setLevel(level)
    if not any(getattr(h, "_visionzoo", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._visionzoo = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _onnx_flags() -> tuple:
    """The two objects whose flags ``torch.onnx.is_in_onnx_export`` reads (imported once: that function imports
    them at every call), or None where this torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return _flags, GLOBALS


_ONNX = _onnx_flags()
_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def tracing() -> bool:
    """A tracer is recording (``torch.jit.trace``, dynamo / ``torch.export``, ONNX export) or fake
    tensors are propagating: the sizes may be symbolic and no ctypes kernel may run.

    What ``torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export() or
    torch._guards.detect_fake_mode() is not None`` says, read from the same flags with C lookups where torch has
    them: models ask once per layer, and inside a model's forward (its code cold in the caches) those four
    calls took ~40 us on a 2-vCPU Xeon, a Vim-Ti layer's ~2%."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():  # dynamo folds the first (it cannot trace the second)
        return True
    if _ONNX is None:
        if torch.onnx.is_in_onnx_export():
            return True
    elif _ONNX[1].in_onnx_export or _ONNX[0]._is_onnx_exporting:
        return True
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return True
    if _FAKE_KEY is not None:
        return torch._C._get_dispatch_mode(_FAKE_KEY) is not None
    return torch._guards.detect_fake_mode() is not None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``forward`` / ``backward`` take the op's own (per-op uniform) arguments. ``available(device_type)``
    and ``can_run(x, **facts)`` return None when the backend can run, else the reason it cannot (``x``:
    the op's leading tensor, or anything with ``.device`` and ``.dtype``; ``facts``: sizes a kernel
    limits, e.g. the filter length). ``devices`` / ``dtypes``: None means any.
    """

    name: str
    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    available: Optional[Callable[[str], Reason]] = None
    can_run: Optional[Callable[..., Reason]] = None
    devices: Optional[tuple[str, ...]] = None
    dtypes: Optional[tuple[torch.dtype, ...]] = None
    fallible: bool = False  # hand-written (Triton) kernel: falls back on a first-use failure under auto
    native: bool = False  # calls a C kernel through ctypes: never while tracing

    def why_not_on(self, device_type: str) -> Reason:
        """Why the backend cannot run on ``device_type`` at all (None: it can, for some inputs)."""
        if self.devices is not None and device_type not in self.devices and device_type != "meta":
            return f"not available on device type {device_type!r} (runs on {', '.join(self.devices)})"
        return self.available(device_type) if self.available is not None else None

    def why_not(self, x: Any, facts: Mapping[str, Any]) -> Reason:
        """Why the backend cannot run for ``x`` (None: it can)."""
        reason = self.why_not_on(x.device.type)
        if reason is None and self.dtypes is not None and x.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reason = f"does not support dtype {x.dtype} ({names})"
        if reason is None and self.can_run is not None:
            reason = self.can_run(x, **facts)
        return reason


@dataclass
class OpDecl:
    """An op: its backends (by name) and the order ``auto`` tries them in per device type.

    ``auto_order`` maps a device type to names, best first; ``"default"`` covers the other device types.
    """

    name: str
    backends: Sequence[Backend]
    auto_order: Mapping[str, tuple[str, ...]]
    by_name: dict[str, Backend] = field(init=False, repr=False)

    def __post_init__(self):
        self.by_name = {b.name: b for b in self.backends}
        _DECLARED[self.name] = self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.by_name)

    @property
    def env_var(self) -> str:
        return f"VISIONZOO_BACKEND_{self.name.upper()}"

    def add(self, backend: Backend, auto_before: Optional[dict[str, str]] = None) -> None:
        """Add a backend (e.g. a ``flex`` one from its own file); ``auto_before={"cuda": "triton"}`` puts it
        in the CUDA order in front of ``triton`` (appended when that name is not in the order)."""
        self.backends = (*self.backends, backend)
        self.by_name[backend.name] = backend
        for device_type, before in (auto_before or {}).items():
            order = list(self.auto_order.get(device_type, self.auto_order["default"]))
            order.insert(order.index(before) if before in order else len(order), backend.name)
            self.auto_order = {**self.auto_order, device_type: tuple(order)}

    def check_name(self, requested: str, label: Optional[str] = None) -> None:
        """``ValueError`` for a backend name the op does not define (``"auto"`` is fine)."""
        if requested != "auto" and requested not in self.by_name:
            raise ValueError(f"{label or self.name}: unknown backend {requested!r}; known backends: auto, "
                             f"{', '.join(self.names)}")

    def is_available(self, name: str, device_type: str) -> bool:
        """Whether backend ``name`` runs on ``device_type`` for some inputs (no input-dependent checks)."""
        return self.by_name[name].why_not_on(device_type) is None

    def order(self, device_type: str) -> tuple[str, ...]:
        return tuple(self.auto_order.get(device_type, self.auto_order["default"]))

    def select(self, requested: str, x: Any, **facts) -> str:
        """The name of the backend that runs for ``x`` when ``requested`` is asked for."""
        return self._select(requested, x, facts)[0].name

    def _select(self, requested: str, x: Any, facts: Mapping[str, Any]) -> tuple[Backend, bool]:
        """``(backend, forced)``: the backend that runs, and whether it was asked for by name."""
        name = requested
        if requested == "auto":
            name = os.environ.get(self.env_var, "").strip() or "auto"
            if name != "auto" and name not in self.by_name:
                raise ValueError(f"{self.name}: unknown {self.env_var} {name!r}; known backends: "
                                 f"{', '.join(self.names)}")
        else:
            self.check_name(requested)
        device_type, dtype = x.device.type, getattr(x, "dtype", None)
        if name == "auto":
            return self._walk(device_type, dtype, x, facts, [])
        backend = self.by_name[name]
        if backend.native and tracing():
            return self._walk(device_type, dtype, x, facts, [(name, "a C kernel: not while tracing")])
        # backend= is for this call: whatever stops it is an error. The environment variable applies to
        # every call of the op, so inputs the backend does not take (a dtype, a size) go to ``auto``.
        from_env = requested == "auto"
        reason = backend.why_not_on(device_type) if from_env else backend.why_not(x, facts)
        if reason is not None:
            raise RuntimeError(f"{self.name}: backend {name!r} cannot run here: {reason}")
        reason = backend.why_not(x, facts) if from_env else None
        if reason is not None:
            return self._walk(device_type, dtype, x, facts, [(name, f"{self.env_var}: {reason}")])
        self._log(name, device_type, dtype, [], True)
        return backend, True

    def _walk(self, device_type, dtype, x, facts, skipped) -> tuple[Backend, bool]:
        traced = tracing()
        for name in self.order(device_type):
            backend = self.by_name[name]
            if (self.name, name, device_type, dtype) in _broken:
                reason = "failed on its first use here (see the warning above)"
            elif backend.native and traced:
                reason = "a C kernel: not while tracing"
            else:
                reason = backend.why_not(x, facts)
            if reason is None:
                self._log(name, device_type, dtype, skipped, False)
                return backend, False
            skipped.append((name, reason))
        detail = "; ".join(f"{n}: {r}" for n, r in skipped)
        raise RuntimeError(f"{self.name}: no backend can run on {device_type} ({dtype}): {detail}")

    def _log(self, chosen: str, device_type: str, dtype, skipped, forced: bool) -> None:
        key = (self.name, device_type, dtype, chosen)
        if key in _logged:
            return
        _logged.add(key)
        for name, reason in skipped:
            _logger.debug("%s: skipped backend %r on %s/%s: %s", self.name, name, device_type, dtype, reason)
        _logger.info("%s: backend %r on %s/%s%s", self.name, chosen, device_type, dtype,
                     " (requested)" if forced else "")

    def dispatch(self, requested: str, x: Any, run: Callable[[Backend], T], **facts) -> T:
        """``run(backend)`` on the backend selected for ``x``, with the fail-safe for fallible backends."""
        while True:
            backend, forced = self._select(requested, x, facts)
            key = (self.name, backend.name, x.device.type, x.dtype)
            if forced or not backend.fallible or key in _proven:
                return run(backend)
            try:
                result = run(backend)
            except Exception as error:  # noqa: BLE001 - a hand-written kernel failing to build or launch
                _broken.add(key)
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                _logger.warning("%s: backend %r failed on first use on %s/%s and is now skipped there "
                                "(%s: %s); rerunning on the next backend", self.name, backend.name,
                                x.device.type, x.dtype, type(error).__name__, first)
                continue
            _proven.add(key)
            return result


@functools.lru_cache(maxsize=None)
def optional_import(module: str, name: str) -> Any:
    """``module.name`` from an optional package (mamba_ssm, causal_conv1d, natten), imported on first use and
    cached; None when the package is missing or its import fails in any way (ABI mismatch with torch, no
    CUDA at import, ...): a broken install makes the backend unavailable, it never breaks visionzoo."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def triton_backend(name: str, launcher, forward=None, backward=None, **kwargs) -> Backend:
    """A hand-written Triton backend: ``launcher`` is its ``_triton`` module (``is_available`` /
    ``unavailable_reason``, looked up at call time), ``fallible`` and limited to the launcher's dtypes."""
    def available(device_type: str) -> Reason:
        if launcher.is_available(device_type):
            return None
        why = getattr(launcher, "unavailable_reason", None)
        why = why(device_type) if why is not None else None
        return f"not available on device type {device_type!r}" + (f": {why}" if why else "")

    return Backend(name, forward, backward, available=available, dtypes=tuple(launcher.SUPPORTED_DTYPES),
                   fallible=True, **kwargs)


# ------------------------------------------------------------------------------------------- aten paths
_ATEN_PATHS: dict = {}


def register_aten_path(op) -> Callable[[Callable], Callable]:
    """Decorator: record ``fn`` as custom op ``op``'s (the ``torch.library.custom_op`` object) plain-aten
    implementation: same arguments and outputs, traceable by ``torch.export`` with a dynamic batch
    (no Python branch on the batch size), no ctypes or Triton."""
    def wrap(fn: Callable) -> Callable:
        _ATEN_PATHS[op] = fn
        return fn
    return wrap


def _import_ops() -> None:
    """Import every op package (each declares itself and registers its aten paths on import)."""
    from . import causal_conv1d, neighborhood_aggregation, reversed_attention, routing_attention  # noqa: F401
    from . import rms_norm, selective_scan, sparse_attention  # noqa: F401


def decompositions() -> dict:
    """``{OpOverload: fn}`` for every visionzoo custom op: ``ep.run_decompositions(decompositions())``."""
    _import_ops()
    return {op._opoverload: fn for op, fn in _ATEN_PATHS.items()}


def declaration(op: str) -> OpDecl:
    """The :class:`OpDecl` named ``op`` (the name in ``VISIONZOO_BACKEND_<OP>``); ``ValueError`` if none."""
    _import_ops()
    if op not in _DECLARED:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(_DECLARED))}")
    return _DECLARED[op]


def is_available(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` of ``op`` runs on ``device_type`` for some inputs (what the install has: a C
    compiler, Triton, mamba_ssm, ...), e.g. ``is_available("selective_scan", "triton", "cuda")``."""
    decl = declaration(op)
    decl.check_name(backend)
    return decl.is_available(backend, device_type)


def why_not(op: str, backend: str, x: Any, **facts) -> Reason:
    """Why ``backend`` of ``op`` cannot run for tensors like ``x`` (None: it can), e.g. for a benchmark that
    times every backend that runs here."""
    decl = declaration(op)
    decl.check_name(backend)
    return decl.by_name[backend].why_not(x, facts)


def resolve(op: str, requested: str, x: Any, **facts) -> str:
    """The backend ``op`` runs for tensors like ``x`` when ``requested`` is asked for (``"auto"`` walked,
    ``VISIONZOO_BACKEND_<OP>`` honoured; ``facts`` as the op passes them, e.g. ``dstate=16``)."""
    return declaration(op).select(requested, x, **facts)


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Within the block every public op entry runs its plain-aten path (no custom op, no C or Triton
    kernel), e.g. for an exporter that should see standard operators only."""
    previous = getattr(_local, "aten_only", False)
    _local.aten_only = True
    try:
        yield
    finally:
        _local.aten_only = previous


def aten_only_enabled() -> bool:
    return getattr(_local, "aten_only", False)


def call(op, *args):
    """Call custom op ``op``, or its plain-aten path inside :func:`aten_only`."""
    if aten_only_enabled():
        return _ATEN_PATHS[op](*args)
    return op(*args)
