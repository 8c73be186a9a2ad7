"""The ``visionzoo::reversed_attention`` custom op (the ``chunked`` backend) and the op's declaration (:data:`RA`).

The op returns ``(out, dependency, mass)``; an output not asked for is an empty ``(0,)`` tensor (an op's
outputs cannot be None). It has a fake kernel (meta device, ``torch.compile``, ``torch.export`` with a
dynamic batch: the block size, which depends on the batch, is chosen inside the op), a FLOP formula
(``2 * B * H * N^2 * (Dk + Dv)``, the dense count the matmuls of either backend add up to), autograd
(the chunked backward recomputes each block; the dependency map and the mass get no gradient) and a
plain-aten path (the dense reference, for exporters). ``reference`` runs as plain autograd ops outside
the op: it is the only backend with attention dropout. Autocast rule: none registered; block products
accumulate in fp32 for fp16/bf16 inputs and the output is in ``v``'s dtype. Tracing rule: no ctypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._dispatch import Backend, OpDecl, register_aten_path
from ._chunked import reversed_attention_chunked, reversed_attention_chunked_backward
from ._reference import reversed_attention_reference


def _chunked_can_run(x, dropout_p: float = 0.0) -> Optional[str]:
    if dropout_p > 0.0:
        return (f"it has no attention dropout (dropout_p={dropout_p}); use backend='reference' or 'auto', "
                f"or dropout_p=0")
    return None


# ``auto`` takes ``chunked`` (on 2 CPU cores as fast as the dense path at N=196 and faster at N=1024,
# forward and backward; benchmarks/dependencyvit_cpu.md) unless attention dropout is active.
RA = OpDecl("reversed_attention", backends=(
    Backend("reference", reversed_attention_reference),
    Backend("chunked", reversed_attention_chunked, reversed_attention_chunked_backward, can_run=_chunked_can_run),
), auto_order={"default": ("chunked", "reference")})
BACKENDS = RA.names


def flops(batch: int, heads: int, length: int, head_dim: int, v_head_dim: int) -> int:
    """FLOPs (multiply-add = 2): ``q k^T`` plus ``A^T v``."""
    return 2 * batch * heads * length * length * (head_dim + v_head_dim)


def _outputs(out: Tensor, dependency: Optional[Tensor], mass: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    def empty():
        return out.new_empty((0,))
    return out, dependency if dependency is not None else empty(), mass if mass is not None else empty()


@torch.library.custom_op("visionzoo::reversed_attention", mutates_args=())
def reversed_attention_op(q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], scale: float, chunk: int,
                          return_dependency: bool, return_mass: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``out (B, H, N, Dv)``, ``dependency (B, N, N)`` and ``mass (B, N)`` (each ``(0,)`` unless asked for)."""
    return _outputs(*RA.dispatch(backend, q, lambda b: b.forward(q, k, v, weight, scale, chunk, return_dependency,
                                                                 return_mass)))


@reversed_attention_op.register_fake
def _(q, k, v, weight, scale, chunk, return_dependency, return_mass, backend):
    B, H, N, _ = q.shape
    return (v.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, N, N) if return_dependency else (0,)),
            q.new_empty((B, N) if return_mass else (0,)))


@register_aten_path(reversed_attention_op)
def _reversed_attention_aten(q, k, v, weight, scale, chunk, return_dependency, return_mass, backend="auto"):
    return _outputs(*reversed_attention_reference(q, k, v, weight, scale, 0.0, return_dependency, return_mass))


def _setup_context(ctx, inputs, output):
    q, k, v, weight, scale, chunk, _, _, backend = inputs
    ctx.save_for_backward(q, k, v, weight)
    ctx.scale, ctx.chunk, ctx.backend = scale, chunk, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_dependency, _grad_mass):
    q, k, v, weight = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:4])
    if grad_out is None or not any(needs):
        return (None,) * 9
    grads = RA.dispatch(ctx.backend, q, lambda b: b.backward(q, k, v, weight, ctx.scale, ctx.chunk, grad_out, needs))
    return (*grads, None, None, None, None, None)


reversed_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.reversed_attention)
def _flop_formula(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, N, D = q_shape
    return flops(B, H, N, D, v_shape[-1])
