"""Backend selection shared by every op in :mod:`visionzoo.ops`.

Each op has a ``reference`` backend (plain PyTorch, defines the semantics) and faster ones. A call
asks for ``backend="auto"`` (the default) or a name. ``auto`` can be overridden per op with the
environment variable ``VISIONZOO_BACKEND_<OP>`` (e.g. ``VISIONZOO_BACKEND_SELECTIVE_SCAN=reference``).
The backend ``auto`` resolves to is logged once per (op, device type, backend).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Sequence

_logger = logging.getLogger("visionzoo.ops")
_logged: set[tuple[str, str, str]] = set()


def env_override(op: str) -> str | None:
    value = os.environ.get(f"VISIONZOO_BACKEND_{op.upper()}", "").strip()
    return value or None


def resolve_backend(
    op: str,
    requested: str,
    device_type: str,
    known: Sequence[str],
    auto_order: Iterable[str],
    is_available: Callable[[str, str], bool],
) -> str:
    """Turn a requested backend name into the one that runs.

    Args:
        op: op name, e.g. ``"selective_scan"`` (used for the env variable and the log line).
        requested: ``"auto"`` or one of ``known``.
        device_type: ``"cpu"``, ``"cuda"``, ``"meta"`` ...
        known: every backend name the op defines.
        auto_order: candidates tried by ``auto``, best first.
        is_available: ``is_available(name, device_type)`` says whether a backend can run here.
    """
    explicit = requested != "auto"
    name = requested if explicit else (env_override(op) or "auto")
    if name != "auto":
        if name not in known:
            source = "backend" if explicit else f"VISIONZOO_BACKEND_{op.upper()}"
            raise ValueError(f"{op}: unknown {source} {name!r}; known backends: {', '.join(known)}")
        if not is_available(name, device_type):
            raise RuntimeError(f"{op}: backend {name!r} is not available on device type {device_type!r}")
        chosen = name
    else:
        chosen = next((b for b in auto_order if is_available(b, device_type)), None)
        if chosen is None:
            raise RuntimeError(f"{op}: no backend available on device type {device_type!r}")
    key = (op, device_type, chosen)
    if key not in _logged:
        _logged.add(key)
        _logger.info("visionzoo.ops.%s: using backend %r on %s%s", op, chosen, device_type,
                     "" if not explicit else " (requested)")
    return chosen
