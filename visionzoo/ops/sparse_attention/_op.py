"""The ``visionzoo::sparse_attention`` custom op.

Registering the op gives, for every fast backend: a fake (meta) kernel, so shapes propagate on the meta
device and under ``torch.compile``; a FLOP formula for ``FlopCounterMode`` that counts the kept
connections only (``P`` dense rows of ``N`` keys plus ``N - P`` rows of ``K`` keys, for ``q k^T`` and for
``p v``) — the theoretical cost, which is what ``gather`` and ``triton`` execute; and one autograd formula that
dispatches to the backend's backward. ``reference`` runs outside the op as plain autograd ops, so a
FLOP counter sees its dense matmuls: the official cost as executed.

``backend`` is the name the caller asked for (``"auto"`` included), selected when the op runs (forward
and backward alike, ``SPARSE.dispatch``). The op's plain-aten path (for exporters) is the reference.
Autocast rule: none registered; ``q``, ``k``, ``v`` share a dtype, the output is in ``v``'s. Tracing rule:
the attention backends call no ctypes; the key selection's ``cpu`` backend (:data:`KEYS`) is ``native``
and never runs while tracing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _flex
from .._dispatch import Backend, OpDecl, register_aten_path, triton_backend
from . import _keys_cpu, _triton
from ._gather import sparse_attention_gather, sparse_attention_gather_backward
from ._masked import sparse_attention_masked, sparse_attention_masked_backward
from ._reference import sparse_attention_reference
from ._select import top_indices


# Forwards take (q, k, v, idx, scale, dense_rows); backwards (q, k, v, idx, scale, dense_rows, out,
# grad_out, needs) -> (dq, dk, dv). ``reference`` runs outside the custom op (plain autograd ops).
def _masked_forward(*args):
    return sparse_attention_masked(*args).contiguous()


def _masked_backward(q, k, v, idx, scale, dense_rows, out, grad_out, needs):
    return sparse_attention_masked_backward(q, k, v, idx, scale, dense_rows, grad_out, needs)


def _flex_forward(*args):
    from ._flex import sparse_attention_flex  # torch.nn.attention.flex_attention, imported on first use

    return sparse_attention_flex(*args)


def _gather_backward(q, k, v, idx, scale, dense_rows, out, grad_out, needs):
    return sparse_attention_gather_backward(q, k, v, idx, scale, dense_rows, grad_out, needs)


# ``auto`` candidates per device type, best first. ``triton`` only on CUDA (on CPU it runs in Triton's
# slow interpreter, for tests). On CUDA it is chosen without a measurement in this repository yet
# (benchmarks/bench_sparse_attention_cuda.py is the check); fp64 falls back to ``masked``. ``flex``
# (PyTorch's maintained FlexAttention kernel, compiled on first use; plain autograd, run by the public
# entry like ``reference``) leads on CUDA, before the hand-written ``triton``; on CPU only by name.
SPARSE = OpDecl("sparse_attention", backends=(
    Backend("reference", sparse_attention_reference, _masked_backward),
    Backend("masked", _masked_forward, _masked_backward),
    Backend("gather", sparse_attention_gather, _gather_backward),
    Backend("flex", _flex_forward, available=lambda d: _flex.unavailable_reason(d), can_run=_flex.cannot_run,
            fallible=True),
    triton_backend("triton", _triton, _triton.sparse_attention_triton,
                   lambda *args: _triton.sparse_attention_triton_backward(*args)),
), auto_order={"cuda": ("flex", "triton", "masked"), "default": ("masked",)})
BACKENDS = SPARSE.names
is_available = SPARSE.is_available
resolve = SPARSE.select  # (requested, x) -> the name of the backend that runs for x


def flops(batch: int, heads: int, num_tokens: int, kept: int, dense_rows: int, d_qk: int, d_v: int) -> int:
    """FLOPs (2 per multiply-add) of the kept connections: ``P*N + (N-P)*K`` scores and as many
    weighted value rows."""
    entries = dense_rows * num_tokens + (num_tokens - dense_rows) * kept
    return 2 * batch * heads * entries * (d_qk + d_v)


@torch.library.custom_op("visionzoo::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                        backend: str) -> Tensor:
    """``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)``, ``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, d_v)``."""
    return SPARSE.dispatch(backend, q, lambda b: b.forward(q, k, v, idx, scale, dense_rows))


register_aten_path(sparse_attention_op)(lambda q, k, v, idx, scale, dense_rows, backend="auto":
                                         sparse_attention_reference(q, k, v, idx, scale, dense_rows))


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
    grads = SPARSE.dispatch(ctx.backend, q, lambda b: b.backward(q, k, v, idx, *ctx.args, out, grad_out, needs))
    return (*grads, None, None, None, None)


sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.sparse_attention)
def _flop_formula(q_shape, k_shape, v_shape, idx_shape, scale, dense_rows, *args, out_shape=None, **kwargs) -> int:
    B, H, N, d = q_shape
    return flops(B, H, N, idx_shape[-1], dense_rows, d, v_shape[-1])


# ---------------------------------------------------------------- Sparsifiner's key selection
def _keys_torch(cols: Tensor, weights: Tensor, table: Tensor, budget: int) -> Tensor:
    """Scores as one ``embedding_bag`` (the kept basis rows summed in ascending order), then :func:`top_indices`."""
    T = cols.shape[-1]
    scores = F.embedding_bag(cols.reshape(-1, T), table, per_sample_weights=weights.reshape(-1, T), mode="sum")
    return top_indices(scores.view(*cols.shape[:-1], table.shape[-1]), budget)


def _keys_cpu_available(device_type: str) -> Optional[str]:
    return None if _keys_cpu.load() is not None else "no C compiler, the build failed or VISIONZOO_CPU_KERNELS=0"


def _keys_cpu_can_run(x, keys: Optional[int] = None, weights_dtype=torch.float32) -> Optional[str]:
    if weights_dtype != torch.float32:
        return f"takes fp32 weights, got {weights_dtype}"
    return None if keys is None or keys <= _keys_cpu.NMAX else f"takes N <= {_keys_cpu.NMAX} keys, got {keys}"


KEYS = OpDecl("sparse_keys", backends=(
    Backend("torch", _keys_torch),
    Backend("cpu", _keys_cpu.kept_keys_cpu, available=_keys_cpu_available, can_run=_keys_cpu_can_run,
            devices=("cpu",), dtypes=(torch.float32,), native=True),
), auto_order={"cpu": ("cpu", "torch"), "default": ("torch",)})
