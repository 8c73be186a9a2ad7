"""The ``visionzoo::causal_conv1d`` and ``visionzoo::causal_conv1d_bidirectional`` custom ops and the
conv's declaration (:data:`CONV`).

Each op has a fake kernel (meta device, ``torch.compile``), a FLOP formula (``2 * batch * dim * L * K``
per direction), an autograd formula (the ``cpu`` backend's C backward; elsewhere the cheap forward
recomputed under autograd and differentiated: the ``cuda`` kernel on CUDA, ``shifted`` otherwise) and a
plain-aten path (``reference``, for exporters). Autocast
rule: none registered; the weights are cast to ``x``'s dtype and the output is in ``x``'s dtype. Tracing
rule: the ``cpu`` backend (ctypes) is ``native`` and never runs while tracing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._dispatch import Backend, OpDecl, register_aten_path
from . import _cpu, _cuda
from ._reference import causal_conv1d_reference
from ._shifted import causal_conv1d_shifted


def _differentiate(fn):
    """A backward that recomputes ``fn`` (plain torch ops) under autograd and differentiates it."""
    def backward(x, weight, bias, activation, grad_out, needs):
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip((x, weight, bias), needs)]
            out = fn(leaves[0], leaves[1], leaves[2], activation)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return tuple(next(grads) if (t is not None and t.requires_grad) else None for t in leaves)
    return backward


def _cpu_available(device_type: str) -> Optional[str]:
    return None if _cpu.load() is not None else "no C compiler, the build failed or VISIONZOO_CPU_KERNELS=0"


def _cpu_can_run(x, K: Optional[int] = None) -> Optional[str]:
    if x.dtype == torch.float32 and (K is None or K <= _cpu.KMAX):
        return None
    return f"takes fp32 inputs and K <= {_cpu.KMAX}, got {x.dtype} and K={K}"


def _cuda_available(device_type: str) -> Optional[str]:
    return None if _cuda.load() is not None else "the causal_conv1d package does not import"


_shifted_backward = _differentiate(causal_conv1d_shifted)
CONV = OpDecl("causal_conv1d", backends=(
    Backend("reference", causal_conv1d_reference, _shifted_backward),
    Backend("shifted", causal_conv1d_shifted, _shifted_backward),
    Backend("cpu", _cpu.causal_conv1d_cpu, _cpu.causal_conv1d_cpu_backward, available=_cpu_available, can_run=_cpu_can_run,
            devices=("cpu",), native=True),
    Backend("cuda", _cuda.causal_conv1d_cuda, _differentiate(_cuda.causal_conv1d_cuda), available=_cuda_available,
            devices=("cuda",)),
), auto_order={"default": ("cuda", "cpu", "shifted")})
BACKENDS = CONV.names


def _dispatch(backend: str, x: Tensor, weight: Tensor, run):
    return CONV.dispatch(backend, x, run, K=weight.shape[1])


@torch.library.custom_op("visionzoo::causal_conv1d", mutates_args=())
def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _dispatch(backend, x, weight, lambda b: b.forward(x, weight, bias, activation))


@causal_conv1d_op.register_fake
def _(x, weight, bias, activation, backend):
    return torch.empty_like(x)


register_aten_path(causal_conv1d_op)(lambda x, weight, bias, activation, backend="auto":
                                     causal_conv1d_reference(x, weight, bias, activation))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation
    ctx.backend = backend


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _dispatch(ctx.backend, x, weight, lambda b: b.backward(x, weight, bias, ctx.activation, grad_out, needs))
    return (*grads, None, None)


causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.causal_conv1d)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    batch, dim, length = x_shape
    return 2 * batch * dim * length * weight_shape[1]


# ---------------------------------------------------------------- both directions of a Vim mixer


def _bidirectional_out(x: Tensor) -> Tensor:
    """The output buffer: time-major ``(batch, L, 2E)`` memory when ``x``'s channels are contiguous."""
    batch, E, length = x.shape
    if x.stride(1) == 1:
        return x.new_empty(batch, length, 2 * E).transpose(1, 2)
    return x.new_empty(batch, 2 * E, length)


def _both_directions(x: Tensor) -> Tensor:
    return torch.cat([x, x.flip(-1)], dim=1)


@torch.library.custom_op("visionzoo::causal_conv1d_bidirectional", mutates_args=())
def causal_conv1d_bidirectional_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                                   backend: str) -> Tensor:
    out = _bidirectional_out(x)

    def run(b):
        if b.name == "cpu":  # reads x backwards in place: no flipped or concatenated copy
            return _cpu.causal_conv1d_bidirectional_cpu(x, weight, bias, activation, out)
        return out.copy_(b.forward(_both_directions(x), weight, bias, activation))

    return _dispatch(backend, x, weight, run)


@causal_conv1d_bidirectional_op.register_fake
def _(x, weight, bias, activation, backend):
    return _bidirectional_out(x)


register_aten_path(causal_conv1d_bidirectional_op)(lambda x, weight, bias, activation, backend="auto":
                                                   causal_conv1d_reference(_both_directions(x), weight, bias,
                                                                           activation))


def _bidirectional_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    def run(b):
        if b.name == "cpu":  # reads x (and writes dx) backwards in place, as the forward
            return _cpu.causal_conv1d_cpu_backward(x, weight, bias, ctx.activation, grad_out, needs, bidirectional=True)
        return _differentiate(lambda x_, w, b_, act: causal_conv1d_shifted(_both_directions(x_), w, b_, act))(
            x, weight, bias, ctx.activation, grad_out, needs)

    return (*_dispatch(ctx.backend, x, weight, run), None, None)


causal_conv1d_bidirectional_op.register_autograd(_bidirectional_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.causal_conv1d_bidirectional)
def _bidirectional_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    batch, E, length = x_shape
    return 2 * batch * 2 * E * length * weight_shape[1]
