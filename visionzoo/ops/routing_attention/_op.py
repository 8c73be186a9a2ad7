"""The ``visionzoo::bi_level_routing_attention`` custom op.

Registering BRA as a ``torch.library`` custom op gives, for every backend:

* a fake (meta) kernel, so shapes propagate on the meta device and under ``torch.compile``;
* a FLOP formula for ``FlopCounterMode`` (routing matmul + both attention matmuls, as fvcore counts the
  official module's ``@`` ops; the gather and the region means are not FLOPs there either);
* one autograd formula that dispatches to the backend's backward.

The op returns ``(out, idx)``: the routing indices are an output so the backward sees exactly the
routing of the forward. ``backend`` is the name the caller asked for (``"auto"`` included) and is
resolved when the op runs, so ``torch.compile`` never traces the environment-dependent choice.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._backend import resolve_backend
from ._chunked import bra_chunked, bra_chunked_backward
from ._common import from_regions, route, to_regions
from ._reference import bra_reference

OP = "routing_attention"
BACKENDS = ("reference", "chunked")
AUTO_ORDER = ("chunked",)


def is_available(name: str, device_type: str) -> bool:
    return name in BACKENDS


def resolve(requested: str, x: Tensor) -> str:
    return resolve_backend(OP, requested, x.device.type, BACKENDS, AUTO_ORDER, is_available)


def flops(batch: int, n_h: int, n_w: int, region_tokens: int, topk: int, c_qk: int, c_v: int) -> int:
    """FLOPs (2 per multiply-add) of one BRA call: region routing ``(S2 x C_qk) @ (C_qk x S2)`` plus,
    per query region, ``(w2 x C_qk) @ (C_qk x topk*w2)`` and ``(w2 x topk*w2) @ (topk*w2 x C_v)``."""
    S2 = n_h * n_w
    routing = S2 * S2 * c_qk
    attention = S2 * region_tokens * topk * region_tokens * (c_qk + c_v)
    return 2 * batch * (routing + attention)


@torch.library.custom_op("visionzoo::bi_level_routing_attention", mutates_args=())
def bra_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, n_h: int, n_w: int, topk: int, scale: float,
           backend: str) -> tuple[Tensor, Tensor]:
    """Spatial ``q``/``k`` ``(B, H, W, C_qk)``, ``v`` ``(B, H, W, C_v)`` -> ``out`` ``(B, H, W, C_v)`` and the
    routing ``idx`` ``(B, n_h*n_w, topk)`` (int64)."""
    H, W = q.shape[1], q.shape[2]
    qh, kh, vh = (to_regions(x, n_h, n_w, num_heads) for x in (q, k, v))  # (B, m, S2, w2, d)
    idx = route(qh, kh, topk, scale)
    name = resolve(backend, q)
    if name == "reference":
        out = bra_reference(qh, kh, vh, idx, scale)
    else:
        out = bra_chunked(qh, kh, vh, idx, scale)
    return from_regions(out, n_h, n_w, H, W), idx


@bra_op.register_fake
def _(q, k, v, num_heads, n_h, n_w, topk, scale, backend):
    B, H, W, _ = q.shape
    out = v.new_empty((B, H, W, v.shape[-1]))
    idx = q.new_empty((B, n_h * n_w, topk), dtype=torch.int64)
    return out, idx


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, n_h, n_w, topk, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.args = (num_heads, n_h, n_w, scale)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _reference_backward(qh, kh, vh, idx, scale, grad_out, needs):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(need) for x, need in zip((qh, kh, vh), needs)]
        out = bra_reference(*leaves, idx, scale)
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return tuple(next(grads) if need else None for need in needs)


def _backward(ctx, grad_out, grad_idx):
    q, k, v, idx = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if grad_out is None or not any(needs):
        return (None,) * 9
    num_heads, n_h, n_w, scale = ctx.args
    H, W = q.shape[1], q.shape[2]
    qh, kh, vh, go = (to_regions(x, n_h, n_w, num_heads) for x in (q, k, v, grad_out))
    name = resolve(ctx.backend, q)
    if name == "reference":
        grads = _reference_backward(qh, kh, vh, idx, scale, go, needs)
    else:
        grads = bra_chunked_backward(qh, kh, vh, idx, scale, go, needs)
    grads = tuple(from_regions(g, n_h, n_w, H, W) if g is not None else None for g in grads)
    return (*grads, None, None, None, None, None, None)


bra_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.bi_level_routing_attention)
def _flop_formula(q_shape, k_shape, v_shape, num_heads, n_h, n_w, topk, *args, out_shape=None, **kwargs) -> int:
    B, H, W, c_qk = q_shape
    return flops(B, n_h, n_w, (H // n_h) * (W // n_w), topk, c_qk, v_shape[-1])
