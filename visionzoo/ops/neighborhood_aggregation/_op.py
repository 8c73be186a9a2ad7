"""The ``visionzoo::na2d_av`` custom op: fake kernel, FLOP formula and autograd for the fast backends.

``backend`` is passed as the requested name (``"auto"`` included) and resolved when the op runs, so
``torch.compile`` never traces the environment-dependent choice.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._backend import resolve_backend
from . import _triton
from ._natten import natten_available
from ._torch import dense_backward, dense_forward, taps_backward, taps_forward, use_dense

OP = "neighborhood_aggregation"
BACKENDS = ("reference", "torch", "dense", "taps", "natten", "triton")
# ``auto`` candidates per device type, best first. NATTEN's CPU kernel is slower than ``torch`` and a
# NATTEN bridge is opt-in everywhere. On CUDA ``auto`` takes ``triton`` (chosen by design, not yet
# measured against ``dense`` / ``taps`` on a GPU: benchmarks/bench_neighborhood_aggregation_cuda.py).
# On CPU ``triton`` would run in Triton's interpreter (tests only), so ``auto`` never picks it there.
AUTO_ORDER = {"cuda": ("triton", "torch")}
AUTO_ORDER_DEFAULT = ("torch",)


def is_available(name: str, device_type: str) -> bool:
    if name == "natten":
        return device_type in ("cpu", "cuda") and natten_available()
    if name == "triton":
        return _triton.is_available(device_type)
    return name in BACKENDS


def resolve(requested: str, x: Tensor) -> str:
    """The backend that runs for ``x``; ``triton`` on a dtype it lacks (fp64) falls back to ``torch``
    unless it was requested by name."""
    order = AUTO_ORDER.get(x.device.type, AUTO_ORDER_DEFAULT)
    name = resolve_backend(OP, requested, x.device.type, BACKENDS, order, is_available)
    if name == "triton" and x.dtype not in _triton.SUPPORTED_DTYPES:
        if requested == "triton":
            raise RuntimeError(f"{OP}: backend 'triton' does not support dtype {x.dtype}")
        name = "torch"
    return name


def flops(batch: int, groups: int, height: int, width: int, kernel_size: int, channels: int) -> int:
    """FLOPs (2 per multiply-add) of one call: ``K*K*c`` multiply-adds per pixel and group."""
    return 2 * batch * groups * height * width * kernel_size * kernel_size * channels


def _pick(name: str, height: int, width: int, kernel_size: int) -> str:
    if name == "torch":
        return "dense" if use_dense(height, width, kernel_size) else "taps"
    return name


@torch.library.custom_op("visionzoo::na2d_av", mutates_args=())
def na2d_av_op(attn: Tensor, value: Tensor, kernel_size: int, backend: str) -> Tensor:
    """``attn`` ``(B, G, H, W, K*K)``, ``value`` ``(B, G, H, W, c)`` -> ``(B, G, H, W, c)`` (contiguous output).

    ``triton`` reads its inputs through their strides; the other backends get contiguous inputs from
    :func:`..na2d_av`."""
    H, W = value.shape[2], value.shape[3]
    name = _pick(resolve(backend, value), H, W, kernel_size)
    if name == "triton":
        return _triton.triton_forward(attn, value, kernel_size)
    if name == "dense":
        return dense_forward(attn, value, kernel_size)
    return taps_forward(attn, value, kernel_size)


@na2d_av_op.register_fake
def _(attn, value, kernel_size, backend):
    return value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    attn, value, kernel_size, backend = inputs
    ctx.save_for_backward(attn, value)
    ctx.kernel_size = kernel_size
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out):
    attn, value = ctx.saved_tensors
    needs = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
    if grad_out is None or not any(needs):
        return None, None, None, None
    K = ctx.kernel_size
    # Under autocast the incoming gradient can be bf16/fp16 while the op ran in fp32.
    grad_out = grad_out.to(value.dtype)
    name = _pick(resolve(ctx.backend, value), value.shape[2], value.shape[3], K)
    if name == "triton":  # reads grad_out through its strides
        grad_attn, grad_value = _triton.triton_backward(attn, value, K, grad_out, needs)
        return grad_attn, grad_value, None, None
    fn = dense_backward if name == "dense" else taps_backward
    grad_attn, grad_value = fn(attn, value, K, grad_out.contiguous(), needs)
    return grad_attn, grad_value, None, None


na2d_av_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.na2d_av)
def _flop_formula(attn_shape, value_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    B, G, H, W, c = value_shape
    return flops(B, G, H, W, kernel_size, c)
