"""The ``visionzoo::na2d_av`` custom op and the op's declaration (:data:`NA`).

The op has a fake kernel, a FLOP formula, autograd (explicit backwards for ``attn`` and ``value``) and a
plain-aten path (the reference gather + einsum, for exporters). ``backend`` is passed as the requested
name (``"auto"`` included) and selected when the op runs (forward and backward alike, through
``NA.dispatch``), so ``torch.compile`` never traces the environment-dependent choice. Autocast rule: the
public entry runs ``attn`` and ``value`` in their promoted dtype (fp32 softmax weights with bf16 values
under autocast) and returns ``value``'s dtype. Tracing rule: no backend calls ctypes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._dispatch import Backend, OpDecl, register_aten_path, triton_backend
from . import _triton
from ._natten import na2d_av_natten, natten_available
from ._reference import na2d_av_reference
from ._torch import dense_backward, dense_forward, taps_backward, taps_forward, use_dense


# Forwards take (attn, value, kernel_size); backwards (attn, value, kernel_size, grad_out, needs) and
# return (grad_attn, grad_value). The torch backends read contiguous inputs; triton reads any strides.
def _torch_forward(attn, value, K):
    fn = dense_forward if use_dense(value.shape[2], value.shape[3], K) else taps_forward
    return fn(attn.contiguous(), value.contiguous(), K)


def _torch_backward(attn, value, K, grad_out, needs):
    fn = dense_backward if use_dense(value.shape[2], value.shape[3], K) else taps_backward
    return fn(attn.contiguous(), value.contiguous(), K, grad_out.contiguous(), needs)


def _contiguous(fn):
    return lambda attn, value, K, *rest: fn(attn.contiguous(), value.contiguous(), K,
                                            *(r.contiguous() if isinstance(r, Tensor) else r for r in rest))


def _natten_available(device_type: str):
    return None if natten_available() else "not available: needs natten<0.20 (with na2d_av)"


# ``auto`` candidates per device type, best first. NATTEN's CPU kernel is slower than ``torch`` and a
# NATTEN bridge is opt-in on CPU. On CUDA ``auto`` takes NATTEN (maintained) when installed, else ``triton``
# (hand-written, fail-safe; not yet measured against ``dense`` / ``taps`` on a GPU: benchmarks/gpu_check.sh).
# On CPU ``triton`` would run in Triton's interpreter (tests only), so ``auto`` never picks it there.
# ``reference`` and ``natten`` run as plain autograd ops outside the custom op (the public entry).
NA = OpDecl("neighborhood_aggregation", backends=(
    Backend("reference", na2d_av_reference, _torch_backward),
    Backend("torch", _torch_forward, _torch_backward),
    Backend("dense", _contiguous(dense_forward), _contiguous(dense_backward)),
    Backend("taps", _contiguous(taps_forward), _contiguous(taps_backward)),
    Backend("natten", na2d_av_natten, _torch_backward, available=_natten_available, devices=("cpu", "cuda")),
    triton_backend("triton", _triton, lambda attn, value, K: _triton.triton_forward(attn, value, K),
                   lambda attn, value, K, grad_out, needs: _triton.triton_backward(attn, value, K, grad_out, needs)),
), auto_order={"cuda": ("natten", "triton", "torch"), "default": ("torch",)})
BACKENDS = NA.names
is_available = NA.is_available
OUTSIDE_OP = ("reference", "natten")  # plain autograd ops, called by the public entry directly
resolve = NA.select  # (requested, x) -> the name of the backend that runs for x


def flops(batch: int, groups: int, height: int, width: int, kernel_size: int, channels: int) -> int:
    """FLOPs (2 per multiply-add) of one call: ``K*K*c`` multiply-adds per pixel and group."""
    return 2 * batch * groups * height * width * kernel_size * kernel_size * channels


@torch.library.custom_op("visionzoo::na2d_av", mutates_args=())
def na2d_av_op(attn: Tensor, value: Tensor, kernel_size: int, backend: str) -> Tensor:
    """``attn`` ``(B, G, H, W, K*K)``, ``value`` ``(B, G, H, W, c)`` -> ``(B, G, H, W, c)`` (contiguous output)."""
    return NA.dispatch(backend, value, lambda b: b.forward(attn, value, kernel_size))


@na2d_av_op.register_fake
def _(attn, value, kernel_size, backend):
    return value.new_empty(value.shape)


register_aten_path(na2d_av_op)(lambda attn, value, kernel_size, backend="auto":
                               na2d_av_reference(attn, value, kernel_size))


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
    # Under autocast the incoming gradient can be bf16/fp16 while the op ran in fp32.
    grad_out = grad_out.to(value.dtype)
    grad_attn, grad_value = NA.dispatch(ctx.backend, value,
                                        lambda b: b.backward(attn, value, ctx.kernel_size, grad_out, needs))
    return grad_attn, grad_value, None, None


na2d_av_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.na2d_av)
def _flop_formula(attn_shape, value_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    B, G, H, W, c = value_shape
    return flops(B, G, H, W, kernel_size, c)
