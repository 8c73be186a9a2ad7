"""``mamba`` backend: bridge to mamba-ssm's fused CUDA kernel.

``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (github.com/state-spaces/mamba,
Apache-2.0) is imported lazily, the first time the backend is asked for on a CUDA device, and never at
module import time. mamba-ssm's import can fail in many ways (ABI mismatch with torch, missing
Triton, ...), so any exception makes the backend unavailable instead of propagating.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._dispatch import optional_import
from ._chunked import selective_scan_chunked_backward

_UNSET = object()
_selective_scan_fn: object = _UNSET

# Input dtypes mamba-ssm's kernel is compiled for.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load() -> Optional[Callable]:
    """mamba-ssm's ``selective_scan_fn``, or None when it cannot be imported (cached)."""
    global _selective_scan_fn
    if _selective_scan_fn is _UNSET:
        _selective_scan_fn = optional_import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    return _selective_scan_fn


def is_available(device_type: str) -> bool:
    return device_type == "cuda" and load() is not None


def _mamba_args(u, delta, A, B, C, D, z, delta_bias):
    """Cast to the dtypes mamba's kernel expects: u/delta/B/C/z in u's dtype, A/D/delta_bias fp32."""
    dt = u.dtype
    return (
        u, delta.to(dt), A.float(), B.to(dt), C.to(dt),
        D.float() if D is not None else None,
        z.to(dt) if z is not None else None,
        delta_bias.float() if delta_bias is not None else None,
    )


def selective_scan_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Forward through mamba-ssm's kernel. Same arguments/returns as ``selective_scan_reference``."""
    fn = load()
    out, last_state = fn(*_mamba_args(u, delta, A, B, C, D, z, delta_bias),
                         delta_softplus=delta_softplus, return_last_state=True)
    return out, last_state


def selective_scan_mamba_backward(inputs, delta_softplus, grad_out, grad_last_state, needs_input_grad):
    """Gradients by recomputing the forward through mamba-ssm's own autograd function.

    ``inputs``: ``(u, delta, A, B, C, D, z, delta_bias)``. mamba-ssm does not back-propagate into its
    ``last_state`` output: when ``grad_last_state`` is given, the ``chunked`` analytic backward runs.
    """
    if grad_last_state is not None:
        return selective_scan_chunked_backward(*inputs, delta_softplus, grad_out, grad_last_state)
    fn = load()
    with torch.enable_grad():
        leaves = [
            x.detach().requires_grad_(bool(need)) if x is not None else None
            for x, need in zip(inputs, needs_input_grad)
        ]
        out = fn(*_mamba_args(*leaves), delta_softplus=delta_softplus, return_last_state=False)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ()
    it = iter(grads)
    return tuple(next(it) if (x is not None and x.requires_grad) else None for x in leaves)
