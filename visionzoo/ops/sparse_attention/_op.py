"""The ``visionzoo::sparse_attention`` custom op.

Registering the op gives, for every fast backend: a fake (meta) kernel, so shapes propagate on the meta
device and under ``torch.compile``; a FLOP formula for ``FlopCounterMode`` that counts the kept
connections only (``P`` dense rows of ``N`` keys plus ``N - P`` rows of ``K`` keys, for ``q k^T`` and for
``p v``) — the theoretical cost, which is what ``gather`` and ``triton`` execute; and one autograd formula that
dispatches to the backend's backward. ``reference`` runs outside the op as plain autograd ops, so a
FLOP counter sees its dense matmuls: the official cost as executed.

``backend`` is the name the caller asked for (``"auto"`` included), resolved when the op runs.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._backend import resolve_backend
from . import _triton
from ._gather import sparse_attention_gather, sparse_attention_gather_backward
from ._masked import sparse_attention_masked, sparse_attention_masked_backward

OP = "sparse_attention"
BACKENDS = ("reference", "masked", "gather", "triton")
# ``auto`` candidates, best first, per device type. ``triton`` only on CUDA (on CPU it runs in Triton's
# slow interpreter, for tests). On CUDA it is chosen without a measurement in this repository yet
# (benchmarks/bench_sparse_attention_cuda.py is the check); fp64 falls back to ``masked``.
AUTO_ORDER = {"cuda": ("triton", "masked")}
AUTO_ORDER_DEFAULT = ("masked",)


def is_available(name: str, device_type: str) -> bool:
    """``triton`` runs on CUDA, and on CPU only under ``TRITON_INTERPRET=1``; the others run anywhere."""
    if name == "triton":
        return _triton.is_available(device_type)
    return name in BACKENDS


def resolve(requested: str, x: Tensor) -> str:
    order = AUTO_ORDER.get(x.device.type, AUTO_ORDER_DEFAULT)
    name = resolve_backend(OP, requested, x.device.type, BACKENDS, order, is_available)
    if name == "triton" and x.dtype not in _triton.SUPPORTED_DTYPES:
        if requested == "triton":
            raise RuntimeError(f"{OP}: backend 'triton' supports float32/float16/bfloat16, not {x.dtype}")
        name = "masked"
    return name


def flops(batch: int, heads: int, num_tokens: int, kept: int, dense_rows: int, d_qk: int, d_v: int) -> int:
    """FLOPs (2 per multiply-add) of the kept connections: ``P*N + (N-P)*K`` scores and as many
    weighted value rows."""
    entries = dense_rows * num_tokens + (num_tokens - dense_rows) * kept
    return 2 * batch * heads * entries * (d_qk + d_v)


@torch.library.custom_op("visionzoo::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                        backend: str) -> Tensor:
    """``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)``, ``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, d_v)``."""
    name = resolve(backend, q)
    if name == "gather":
        return sparse_attention_gather(q, k, v, idx, scale, dense_rows)
    if name == "triton":
        return _triton.sparse_attention_triton(q, k, v, idx, scale, dense_rows)
    return sparse_attention_masked(q, k, v, idx, scale, dense_rows).contiguous()


@sparse_attention_op.register_fake
def _(q, k, v, idx, scale, dense_rows, backend):
    B, H, N, _ = q.shape
    return v.new_empty((B, H, N, v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, idx, scale, dense_rows, backend = inputs
    # the triton backward needs the output (for rowsum(dout * out)); the others recompute what they need
    ctx.save_for_backward(q, k, v, idx, output if resolve(backend, q) == "triton" else None)
    ctx.args = (scale, dense_rows)
    ctx.backend = backend


def _backward(ctx, grad_out):
    q, k, v, idx, out = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if not any(needs):
        return (None,) * 7
    scale, dense_rows = ctx.args
    name = resolve(ctx.backend, q)
    if name == "gather":
        grads = sparse_attention_gather_backward(q, k, v, idx, scale, dense_rows, grad_out, needs)
    elif name == "triton":
        grads = _triton.sparse_attention_triton_backward(q, k, v, idx, scale, dense_rows, out, grad_out, needs)
    else:
        grads = sparse_attention_masked_backward(q, k, v, idx, scale, dense_rows, grad_out, needs)
    return (*grads, None, None, None, None)


sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.sparse_attention)
def _flop_formula(q_shape, k_shape, v_shape, idx_shape, scale, dense_rows, *args, out_shape=None, **kwargs) -> int:
    B, H, N, d = q_shape
    return flops(B, H, N, idx_shape[-1], dense_rows, d, v_shape[-1])
