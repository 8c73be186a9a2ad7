"""The ``visionzoo::selective_scan`` custom op and the scan's declaration (:data:`SCAN`).

Registering the scan as a ``torch.library`` custom op gives, for every backend:

* a fake (meta) kernel, so shapes propagate on the meta device and under ``torch.compile``;
* a FLOP formula for ``torch.utils.flop_counter.FlopCounterMode``;
* one autograd formula (``register_autograd``) that dispatches to the backend's backward, selected the
  same way as the forward (:meth:`~visionzoo.ops._dispatch.OpDecl.dispatch`);
* its plain-aten path, :func:`selective_scan_aten` (the ``reference`` algorithm), for exporters.

Autocast rule: none registered, the op takes its inputs as they come (e.g. bf16 ``u``/``delta``/``B``/
``C`` from autocast Linears, fp32 ``A``/``D``), computes in fp32 (fp64 for fp64 ``u``) and returns
``out`` in ``u``'s dtype. Tracing rule: the ``cpu`` backend (ctypes) is ``native``, so it never runs
while tracing (:func:`~visionzoo.ops._dispatch.tracing`); ``chunked`` takes its place.

The op always returns ``(out, last_state)``; the public wrapper drops ``last_state`` when it is not
asked for. The ``backend`` argument is the name the caller asked for (``"auto"`` included); it is
selected when the op runs, so ``torch.compile`` never traces the (environment-dependent) choice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._dispatch import Backend, OpDecl, register_aten_path, triton_backend
from . import _cpu, _cpu_bwd, _mamba, _triton
from ._chunked import selective_scan_chunked, selective_scan_chunked_backward
from ._reference import compute_dtype, selective_scan_reference


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


# Every backward takes (inputs, delta_softplus, grad_out, grad_last_state, needs) with inputs
# (u, delta, A, B, C, D, z, delta_bias) and returns their gradients.
def _chunked_backward(inputs, delta_softplus, grad_out, grad_last_state, needs):
    return selective_scan_chunked_backward(*inputs, delta_softplus, grad_out, grad_last_state)


def _cpu_backward(inputs, delta_softplus, grad_out, grad_last_state, needs):
    return _cpu_bwd.selective_scan_cpu_backward(*inputs, delta_softplus, grad_out, grad_last_state)


def _triton_backward(inputs, delta_softplus, grad_out, grad_last_state, needs):
    return _triton.selective_scan_triton_backward(*inputs, delta_softplus, grad_out, grad_last_state)


def _cpu_available(device_type: str) -> Optional[str]:
    return None if _cpu.load() is not None else "no C compiler, the build failed or VISIONZOO_CPU_KERNELS=0"


def _cpu_can_run(x, dstate: Optional[int] = None) -> Optional[str]:
    return None if dstate is None or dstate <= _cpu.NMAX else f"takes N <= {_cpu.NMAX}, got N={dstate}"


def _mamba_available(device_type: str) -> Optional[str]:
    if _mamba.is_available(device_type):
        return None
    return f"not available on device type {device_type!r}" + (" (mamba_ssm does not import)"
                                                              if device_type == "cuda" else "")


# ``auto`` candidates, best first, on every device. ``triton`` is opt-in (backend="triton" or
# VISIONZOO_BACKEND_SELECTIVE_SCAN=triton) until benchmarks/gpu_check.sh has measured it against mamba
# and chunked on a GPU; on CPU it would run in Triton's slow interpreter (tests). ``cpu`` (a C kernel
# compiled on first use) runs fp32 on CPU; ``chunked`` takes everything else.
AUTO_ORDER = ("mamba", "cpu", "chunked")
SCAN = OpDecl("selective_scan", backends=(
    Backend("reference", selective_scan_reference, _reference_backward),
    Backend("chunked", selective_scan_chunked, _chunked_backward),
    Backend("cpu", _cpu.selective_scan_cpu, _cpu_backward, available=_cpu_available, can_run=_cpu_can_run,
            devices=("cpu",), dtypes=_cpu.SUPPORTED_DTYPES, native=True),
    Backend("mamba", _mamba.selective_scan_mamba, _mamba.selective_scan_mamba_backward,
            available=_mamba_available, dtypes=_mamba.SUPPORTED_DTYPES),
    triton_backend("triton", _triton, _triton.selective_scan_triton, _triton_backward),
), auto_order={"default": AUTO_ORDER})
BACKENDS = SCAN.names
is_available = SCAN.is_available
resolve = SCAN.select  # (requested, u, dstate=N) -> the name of the backend that runs for u


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


def output_strides(u: Tensor, channels: Optional[int] = None) -> tuple[int, int, int]:
    """Strides of a ``(batch, channels, L)`` output: time-major (``(L, batch, channels)`` in memory) when
    ``u`` is, else contiguous. ``channels`` defaults to ``u``'s."""
    batch, dim, length = u.shape
    channels = dim if channels is None else channels
    if u.permute(2, 0, 1).is_contiguous():
        return (channels, 1, batch * channels)
    return (channels * length, length, 1)


def with_strides(x: Tensor, strides: tuple[int, ...]) -> Tensor:
    """``x``, copied into a tensor with ``strides`` unless it already has them."""
    if x.stride() == strides:
        return x
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device).copy_(x)


@torch.library.custom_op("visionzoo::selective_scan", mutates_args=())
def selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                      delta_bias: Optional[Tensor], delta_softplus: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``out (batch, dim, L)`` in ``u``'s dtype and ``last_state (batch, dim, N)`` in fp32 (fp64 for fp64 u)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out, last_state = SCAN.dispatch(backend, u, lambda b: b.forward(*args), dstate=A.shape[1])
    return with_strides(out.to(u.dtype), output_strides(u)), last_state.to(compute_dtype(u)).contiguous()


@selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    batch, dim, _length = u.shape
    out = torch.empty_strided(u.shape, output_strides(u), dtype=u.dtype, device=u.device)
    last_state = u.new_empty((batch, dim, A.shape[1]), dtype=compute_dtype(u))
    return out, last_state


@register_aten_path(selective_scan_op)
def selective_scan_aten(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend="auto"):
    """The op in plain aten ops: the ``reference`` algorithm (one step per token, fixed ``L``)."""
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.backend = backend
    # An unused output (usually last_state) gets None instead of a zero tensor.
    ctx.set_materialize_grads(False)


def backward(requested, inputs, delta_softplus, grad_out, grad_last_state, needs):
    """Gradients of ``inputs = (u, delta, A, B, C, D, z, delta_bias)`` by the backward of the backend
    ``requested`` selects (also the bidirectional op's, for its stacked scan)."""
    return SCAN.dispatch(requested, inputs[0],
                         lambda b: b.backward(inputs, delta_softplus, grad_out, grad_last_state, needs),
                         dstate=inputs[2].shape[1])


def _backward(ctx, grad_out, grad_last_state):
    inputs = ctx.saved_tensors
    needs = ctx.needs_input_grad[:8]
    if (grad_out is None and grad_last_state is None) or not any(needs):
        return (None,) * 10
    grads = backward(ctx.backend, inputs, ctx.delta_softplus, grad_out, grad_last_state, needs)
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return (*grads, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.selective_scan)
def _flop_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, *args, out_shape=None,
                  **kwargs) -> int:
    batch, dim, length = u_shape
    return flops(batch, dim, length, A_shape[1], D_shape is not None, z_shape is not None)
