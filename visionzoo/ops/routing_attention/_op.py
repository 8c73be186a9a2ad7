"""The BRA custom ops and backend resolution.

Two ``torch.library`` custom ops, one per kind of backward:

* ``visionzoo::bi_level_routing_attention`` (``chunked``, and ``reference`` when asked for through the
  op): returns ``(out, idx)``; its backward recomputes from Q/K/V and the routing;
* ``visionzoo::bi_level_routing_attention_triton``: returns ``(out, idx, lse)``; the fp32 row statistic
  ``lse`` ``(B, H, W, m)`` is kept for the fused backward.

Each has a fake (meta) kernel, so shapes propagate on the meta device and under ``torch.compile``; a
FLOP formula for ``FlopCounterMode`` (routing matmul + both attention matmuls, as fvcore counts the
official module's ``@`` ops; the gather and the region means are not FLOPs there either); and an
autograd formula. The routing indices are an output, so the backward sees exactly the forward's
routing; and a plain-aten path (the reference, for exporters). The public function selects the backend
once (``ROUTING.dispatch``) and calls the op of that backend. Autocast rule: none registered; ``q``, ``k``,
``v`` must share a dtype and the output is in ``v``'s. Tracing rule: no backend calls ctypes.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _flex
from .._dispatch import Backend, OpDecl, call, register_aten_path, triton_backend
from . import _triton
from ._chunked import bra_chunked, bra_chunked_backward
from ._common import from_regions, route, to_regions
from ._reference import bra_reference


# Every forward takes the validated spatial (q, k, v, num_heads, n_h, n_w, topk, scale) and returns
# (out, idx). ``reference`` runs as plain autograd ops, outside the custom op, so that training keeps the
# official memory behaviour too (autograd holds the topk-fold gathered K/V and the scores).
def _reference_forward(q, k, v, num_heads, n_h, n_w, topk, scale):
    idx = route(q, k, n_h, n_w, topk, scale)
    return _reference_spatial(q, k, v, idx, num_heads, n_h, n_w, scale), idx


def _chunked_forward(*args):
    return call(bra_op, *args, "chunked")


def _flex_forward(*args):
    from ._flex import bra_flex  # torch.nn.attention.flex_attention, imported on first use

    return bra_flex(*args)


def _triton_forward(*args):
    out, idx, _ = call(bra_triton_op, *args)
    return out, idx


# ``auto`` candidates per device type, best first. ``triton`` only on CUDA (on CPU it runs in Triton's
# slow interpreter, for tests): chosen there without a measurement on this project's machines, see
# benchmarks/biformer_cpu.md and benchmarks/bench_routing_attention_cuda.py. Off CUDA, and for dtypes the
# kernel does not take (float64), ``chunked``. ``flex`` (PyTorch's maintained FlexAttention kernel, compiled
# on first use; plain autograd) leads on CUDA, before the hand-written ``triton``; on CPU only by name.
ROUTING = OpDecl("routing_attention", backends=(
    Backend("reference", _reference_forward),
    Backend("chunked", _chunked_forward),
    Backend("flex", _flex_forward, available=lambda d: _flex.unavailable_reason(d), can_run=_flex.cannot_run,
            fallible=True),
    triton_backend("triton", _triton, _triton_forward),
), auto_order={"cuda": ("flex", "triton", "chunked"), "default": ("chunked",)})
BACKENDS = ROUTING.names
is_available = ROUTING.is_available
resolve = ROUTING.select  # (requested, x) -> the name of the backend that runs for x


def flops(batch: int, n_h: int, n_w: int, region_tokens: int, topk: int, c_qk: int, c_v: int) -> int:
    """FLOPs (2 per multiply-add) of one BRA call: region routing ``(S2 x C_qk) @ (C_qk x S2)`` plus,
    per query region, ``(w2 x C_qk) @ (C_qk x topk*w2)`` and ``(w2 x topk*w2) @ (topk*w2 x C_v)``."""
    S2 = n_h * n_w
    routing = S2 * S2 * c_qk
    attention = S2 * region_tokens * topk * region_tokens * (c_qk + c_v)
    return 2 * batch * (routing + attention)


def _reference_spatial(q, k, v, idx, num_heads, n_h, n_w, scale):
    H, W = q.shape[1], q.shape[2]
    qh, kh, vh = (to_regions(x, n_h, n_w, num_heads) for x in (q, k, v))  # (B, m, S2, w2, d)
    return from_regions(bra_reference(qh, kh, vh, idx, scale), n_h, n_w, H, W)


# --- reference / chunked op -------------------------------------------------------------------
@torch.library.custom_op("visionzoo::bi_level_routing_attention", mutates_args=())
def bra_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, n_h: int, n_w: int, topk: int, scale: float,
           backend: str) -> tuple[Tensor, Tensor]:
    """Spatial ``q``/``k`` ``(B, H, W, C_qk)``, ``v`` ``(B, H, W, C_v)`` -> ``out`` ``(B, H, W, C_v)`` and the
    routing ``idx`` ``(B, n_h*n_w, topk)`` (int64). ``backend``: ``"chunked"`` or ``"reference"``."""
    idx = route(q, k, n_h, n_w, topk, scale)
    if backend == "reference":
        return _reference_spatial(q, k, v, idx, num_heads, n_h, n_w, scale), idx
    return bra_chunked(q, k, v, idx, num_heads, n_h, n_w, scale), idx


register_aten_path(bra_op)(lambda q, k, v, num_heads, n_h, n_w, topk, scale, backend="auto":
                           _reference_forward(q, k, v, num_heads, n_h, n_w, topk, scale))


@bra_op.register_fake
def _(q, k, v, num_heads, n_h, n_w, topk, scale, backend):
    B, H, W, _ = q.shape
    return v.new_empty((B, H, W, v.shape[-1])), q.new_empty((B, n_h * n_w, topk), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, n_h, n_w, topk, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.args = (num_heads, n_h, n_w, scale)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _reference_backward(q, k, v, idx, num_heads, n_h, n_w, scale, grad_out, needs):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), needs)]
        out = _reference_spatial(*leaves, idx, num_heads, n_h, n_w, scale)
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return tuple(next(grads) if need else None for need in needs)


def _backward(ctx, grad_out, grad_idx):
    q, k, v, idx = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if grad_out is None or not any(needs):
        return (None,) * 9
    fn = _reference_backward if ctx.backend == "reference" else bra_chunked_backward
    grads = fn(q, k, v, idx, *ctx.args, grad_out, needs)
    return (*grads, None, None, None, None, None, None)


bra_op.register_autograd(_backward, setup_context=_setup_context)


# --- triton op --------------------------------------------------------------------------------
@torch.library.custom_op("visionzoo::bi_level_routing_attention_triton", mutates_args=())
def bra_triton_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, n_h: int, n_w: int, topk: int,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """As ``bi_level_routing_attention`` with the fused Triton kernel; also returns ``lse``
    ``(B, H, W, num_heads)`` fp32 (base-2 log-sum-exp of the scaled scores, for the backward)."""
    idx = route(q, k, n_h, n_w, topk, scale)
    out, lse = _triton.bra_triton_forward(q, k, v, idx, num_heads, n_h, n_w, scale)
    return out, idx, lse


@register_aten_path(bra_triton_op)
def _bra_triton_aten(q, k, v, num_heads, n_h, n_w, topk, scale):
    """The Triton op's outputs in plain aten ops: the reference, with its base-2 log-sum-exp rows."""
    H, W = q.shape[1], q.shape[2]
    idx = route(q, k, n_h, n_w, topk, scale)
    out, lse = bra_reference(*(to_regions(x, n_h, n_w, num_heads) for x in (q, k, v)), idx, scale, return_lse=True)
    return from_regions(out, n_h, n_w, H, W), idx, from_regions(lse, n_h, n_w, H, W)


@bra_triton_op.register_fake
def _(q, k, v, num_heads, n_h, n_w, topk, scale):
    B, H, W, _ = q.shape
    return (v.new_empty((B, H, W, v.shape[-1])), q.new_empty((B, n_h * n_w, topk), dtype=torch.int64),
            q.new_empty((B, H, W, num_heads), dtype=torch.float32))


def _setup_context_triton(ctx, inputs, output):
    q, k, v, num_heads, n_h, n_w, topk, scale = inputs
    out, idx, lse = output
    ctx.save_for_backward(q, k, v, out, lse, idx)
    ctx.args = (num_heads, n_h, n_w, scale)
    ctx.set_materialize_grads(False)


def _backward_triton(ctx, grad_out, grad_idx, grad_lse):
    q, k, v, out, lse, idx = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if grad_out is None or not any(needs):
        return (None,) * 8
    grads = _triton.bra_triton_backward(q, k, v, out, lse, idx, *ctx.args, grad_out, needs)
    return (*grads, None, None, None, None, None)


bra_triton_op.register_autograd(_backward_triton, setup_context=_setup_context_triton)


# --- FLOPs ------------------------------------------------------------------------------------
def _count(q_shape, v_shape, n_h, n_w, topk) -> int:
    B, H, W, c_qk = q_shape
    return flops(B, n_h, n_w, (H // n_h) * (W // n_w), topk, c_qk, v_shape[-1])


@register_flop_formula(torch.ops.visionzoo.bi_level_routing_attention)
def _flop_formula(q_shape, k_shape, v_shape, num_heads, n_h, n_w, topk, *args, out_shape=None, **kwargs) -> int:
    return _count(q_shape, v_shape, n_h, n_w, topk)


@register_flop_formula(torch.ops.visionzoo.bi_level_routing_attention_triton)
def _flop_formula_triton(q_shape, k_shape, v_shape, num_heads, n_h, n_w, topk, *args, out_shape=None,
                         **kwargs) -> int:
    return _count(q_shape, v_shape, n_h, n_w, topk)
