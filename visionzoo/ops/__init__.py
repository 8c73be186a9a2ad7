"""Kernels used by visionzoo models: one sub-package per operation (see DESIGN.md §3).

Every op is declared once with :mod:`._dispatch` (backends, why each can or cannot run, ``auto``'s
order, the fail-safe for hand-written kernels). For exporters, :func:`decompositions` maps every
visionzoo custom op to its plain-aten implementation (``ep.run_decompositions(decompositions())``) and
:func:`aten_only` makes every public op entry run that implementation directly. ``VISIONZOO_LOG=debug``
(read here, at import) shows which backend each op runs and why the others were skipped.
:func:`is_available` and :func:`resolve` answer, by op name, whether a backend can run on a device type
and which backend a call would run (e.g. for benchmarks and tests that skip what the machine lacks).
:func:`tracing` and :func:`aten_only_enabled` tell a model's eager-only fast path (e.g. BiFormer's oneDNN-fused
CPU inference) to step aside for tracers, exporters and the plain-aten mode.
"""
from ._dispatch import (aten_only, aten_only_enabled, configure_logging, decompositions, is_available, resolve, tracing,
                        why_not)

__all__ = ["aten_only", "aten_only_enabled", "decompositions", "is_available", "resolve", "tracing", "why_not"]

configure_logging()
