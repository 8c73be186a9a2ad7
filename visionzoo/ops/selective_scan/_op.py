"""The ``visionzoo::selective_scan`` custom op.

Registering the scan as a ``torch.library`` custom op gives, for every backend:

* a fake (meta) kernel, so shapes propagate on the meta device and under ``torch.compile``;
* a FLOP formula for ``torch.utils.flop_counter.FlopCounterMode``;
* one autograd formula (``register_autograd``) that dispatches to the backend's backward.

The op always returns ``(out, last_state)``; the public wrapper drops ``last_state`` when it is not
asked for. The ``backend`` argument is the name the caller asked for (``"auto"`` included); it is
resolved when the op runs, so ``torch.compile`` never traces the (environment-dependent) choice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._backend import resolve_backend
from . import _cpu, _cpu_bwd, _mamba, _triton
from ._chunked import selective_scan_chunked, selective_scan_chunked_backward
from ._reference import compute_dtype, selective_scan_reference

OP = "selective_scan"
BACKENDS = ("reference", "chunked", "cpu", "mamba", "triton")
# ``auto`` candidates, best first. ``triton`` is only tried on CUDA: on CPU it runs in Triton's slow
# interpreter (for tests, with TRITON_INTERPRET=1), so ``auto`` stays ``mamba -> chunked`` there.
# ``triton`` is opt-in (backend="triton" or VISIONZOO_BACKEND_SELECTIVE_SCAN=triton) until
# benchmarks/gpu_check.sh has measured it against mamba and chunked on a GPU; ``auto`` never picks it.
# ``cpu`` (a C kernel compiled on first use) runs fp32 on CPU; ``chunked`` takes the rest.
AUTO_ORDER = ("mamba", "cpu", "chunked")

# Forward implementations, keyed by backend name. Each takes validated inputs (B, C 4-d) and returns
# (out, last_state).
FORWARD = {
    "reference": selective_scan_reference,
    "chunked": selective_scan_chunked,
    "cpu": _cpu.selective_scan_cpu,
    "mamba": _mamba.selective_scan_mamba,
    "triton": _triton.selective_scan_triton,
}


def is_available(name: str, device_type: str) -> bool:
    """Whether backend ``name`` can run on ``device_type`` (cheap; the mamba-ssm / Triton imports are cached).

    ``triton`` runs on CUDA, and on CPU only under ``TRITON_INTERPRET=1`` (Triton's interpreter).
    """
    if name == "mamba":
        return _mamba.is_available(device_type)
    if name == "triton":
        return _triton.is_available(device_type)
    if name == "cpu":
        return _cpu.is_available(device_type)
    return name in ("reference", "chunked")


_DTYPES = {"mamba": _mamba.SUPPORTED_DTYPES, "triton": _triton.SUPPORTED_DTYPES, "cpu": _cpu.SUPPORTED_DTYPES}


def resolve(requested: str, u: Tensor) -> str:
    """The backend that runs for ``u`` when ``requested`` is asked for."""
    name = resolve_backend(OP, requested, u.device.type, BACKENDS, AUTO_ORDER, is_available)
    if name in _DTYPES and u.dtype not in _DTYPES[name]:
        if requested == name:
            raise RuntimeError(f"{OP}: backend {name!r} does not support dtype {u.dtype}")
        name = "chunked"
    return name


def flops(batch: int, dim: int, length: int, dstate: int, with_D: bool = True, with_z: bool = False) -> int:
    """FLOPs of one selective scan, as counted by mamba-ssm (``flops_selective_scan_ref``).

    ``9 * batch * L * dim * N``, plus ``batch * dim * L`` for the ``D`` skip and the same again for the
    ``z`` gate. These are FLOPs (a multiply-add counts 2), the unit ``FlopCounterMode`` reports.
    """
    total = 9 * batch * length * dim * dstate
    if with_D:
        total += batch * dim * length
    if with_z:
        total += batch * dim * length
    return total


def output_strides(u: Tensor) -> tuple[int, int, int]:
    """Strides of ``out``: time-major (``(L, batch, dim)`` in memory) when ``u`` is, else contiguous."""
    batch, dim, length = u.shape
    if u.permute(2, 0, 1).is_contiguous():
        return (dim, 1, batch * dim)
    return (dim * length, length, 1)


@torch.library.custom_op("visionzoo::selective_scan", mutates_args=())
def selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``out (batch, dim, L)`` in ``u``'s dtype and ``last_state (batch, dim, N)`` in fp32 (fp64 for fp64 u)."""
    name = resolve(backend, u)
    out, last_state = FORWARD[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    strides = output_strides(u)
    if out.stride() != strides:
        out = torch.empty_strided(u.shape, strides, dtype=u.dtype, device=u.device).copy_(out)
    return out, last_state.to(compute_dtype(u)).contiguous()


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    batch, dim, _length = u.shape
    out = torch.empty_strided(u.shape, output_strides(u), dtype=u.dtype, device=u.device)
    last_state = u.new_empty((batch, dim, A.shape[1]), dtype=compute_dtype(u))
    return out, last_state


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend
    # An unused output (usually last_state) gets None instead of a zero tensor.
    ctx.set_materialize_grads(False)


def _reference_backward(inputs, delta_softplus, grad_out, grad_last_state, needs):
    """Recompute the reference forward under autograd and differentiate it."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(bool(need)) if x is not None else None
                  for x, need in zip(inputs, needs)]
        out, last_state = selective_scan_reference(*leaves, delta_softplus=delta_softplus)
        outputs, grads_out = [], []
        for o, g in ((out, grad_out), (last_state, grad_last_state)):
            if g is not None:
                outputs.append(o)
                grads_out.append(g)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True) if wanted else ()
    it = iter(grads)
    return tuple(next(it) if (x is not None and x.requires_grad) else None for x in leaves)


def _backward(ctx, grad_out, grad_last_state):
    inputs = ctx.saved_tensors
    needs = ctx.needs_input_grad[:8]
    if (grad_out is None and grad_last_state is None) or not any(needs):
        return (None,) * 10
    name = resolve(ctx.backend, inputs[0])
    grads = backend_backward(name, inputs, ctx.delta_softplus, grad_out, grad_last_state, needs)
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return (*grads, None, None)


def backend_backward(name, inputs, delta_softplus, grad_out, grad_last_state, needs):
    """Gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` by backend ``name``'s backward (also used by
    the bidirectional op's fallback, :mod:`._bidirectional`)."""
    if name == "reference":
        return _reference_backward(inputs, delta_softplus, grad_out, grad_last_state, needs)
    if name == "mamba" and grad_last_state is None:
        return _mamba.selective_scan_mamba_backward(inputs, delta_softplus, grad_out, needs)
    if name == "triton":  # Triton reverse-scan kernel (states recomputed from chunk checkpoints)
        return _triton.selective_scan_triton_backward(*inputs, delta_softplus, grad_out, grad_last_state)
    if name == "cpu":  # C reverse scan (falls back to chunked's where the kernel is unavailable)
        return _cpu_bwd.selective_scan_cpu_backward(*inputs, delta_softplus, grad_out, grad_last_state)
    # chunked (the analytic backward recomputes the states); also mamba when last_state is
    # differentiated (mamba-ssm ignores that gradient).
    return selective_scan_chunked_backward(*inputs, delta_softplus, grad_out, grad_last_state)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.selective_scan)
def _flop_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, out_shape=None,
                  **kwargs) -> int:
    batch, dim, length = u_shape
    return flops(batch, dim, length, A_shape[1], D_shape is not None, z_shape is not None)
