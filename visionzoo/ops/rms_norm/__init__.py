"""RMSNorm over the last dimension (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), the norm
of Mamba's and Vim's blocks::

    out = x / sqrt(mean(x^2, dim=-1) + eps) * weight

Backends (``backend=``; ``auto`` can be overridden with ``VISIONZOO_BACKEND_RMS_NORM``; declared in ``NORM``):

``reference``
    ``torch.nn.functional.rms_norm``: differentiable, traceable, exports to ONNX. On the CPU it is a
    composite of ~15 aten ops (~25 us for a Vim-Ti layer's 197 x 192 tokens when hot, ~110 us inside a model,
    where each of those ops dispatches cold).
``cpu``
    One C pass per row (:mod:`._cpu`): fp32 CPU tensors, inference only (no autograd through it: with
    gradients needed ``auto`` takes ``reference``), never while tracing or exporting, nor in the plain-aten
    mode (:func:`visionzoo.ops.aten_only`). The sum of squares adds in another order than torch's
    (differences of a few ulp).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import Backend, OpDecl, aten_only_enabled, tracing
from . import _cpu

__all__ = ["rms_norm", "NORM"]


def _reference(x: Tensor, weight: Optional[Tensor], eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    out = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return out if out_dtype is None else out.to(out_dtype)


def _cpu_can_run(x: Tensor, weight: Optional[Tensor] = None) -> Optional[str]:
    if type(x) is not torch.Tensor:
        return f"takes plain tensors, got {type(x).__name__}"
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return "inference only: gradients are needed"
    if weight is not None and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        return f"takes an fp32 CPU weight, got {weight.dtype} on {weight.device.type}"
    if aten_only_enabled():
        return "the plain-aten mode is on"
    return None


NORM = OpDecl("rms_norm", backends=(
    Backend("reference", _reference),
    Backend("cpu", _cpu.rms_norm_cpu, available=_cpu.unavailable, can_run=_cpu_can_run, devices=("cpu",),
            dtypes=(torch.float32,), native=True),
), auto_order={"cpu": ("cpu", "reference"), "default": ("reference",)})


_AUTO_CPU: dict = {}  # VISIONZOO_BACKEND_RMS_NORM's value -> whether ``auto`` picks ``cpu`` for fp32 CPU inference


def _auto_takes_cpu() -> bool:
    env = os.environ.get(NORM.env_var)
    hit = _AUTO_CPU.get(env)
    if hit is None:
        hit = _AUTO_CPU[env] = NORM.select("auto", torch.empty(0)) == "cpu"
    return hit


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, *, out_dtype: Optional[torch.dtype] = None,
             backend: str = "auto") -> Tensor:
    """RMSNorm of ``x`` over its last dimension; ``weight``: ``(x.shape[-1],)`` or None. ``out_dtype``: the
    result cast to it (the ``cpu`` backend writes bf16 directly, the same bits as the cast)."""
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    # Models call this once per block, in CPU inference on the C kernel: that case skips the general selection
    # (the same answer, cached per environment setting; ~40 us a call inside a model's forward, cold).
    if (backend == "auto" and not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu"
            and _cpu_can_run(x, weight) is None and not tracing() and _auto_takes_cpu()):
        return _cpu.rms_norm_cpu(x, weight, eps, out_dtype)
    return NORM.dispatch(backend, x, lambda b: b.forward(x, weight, eps, out_dtype), weight=weight)
