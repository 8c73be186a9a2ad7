"""Reversed attention (DependencyViT) with interchangeable backends.

Ding et al., "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention",
CVPR 2023, arXiv 2304.03282 (no official code: github.com/dingmyu/DependencyViT holds only an MIT
LICENSE). Child tokens are the queries, parent tokens the keys; each child spreads a normalised
distribution over parents and *sends* its value along it, gated by a per-head selector ``p`` and
a message controller ``m``::

    A = softmax_j(q_i . k_j * scale)          (B, H, N_child, N_parent), rows sum to 1
    out = (A^T * p * m) @ v                   out_j = sum_i A[i, j] p[h, i] m[i] v_i
    dependency = sum_h (A^T * p * m)          (B, N_parent, N_child), the soft dependency mask A^M
    mass_j = sum_i dependency[j, i]           what parent j receives (DependencyViT-Lite's pruning score)

Backends (``backend=`` argument or ``auto``; ``auto`` can be overridden with the environment variable
``VISIONZOO_BACKEND_REVERSED_ATTENTION``; declared in ``_op.RA``, see :mod:`visionzoo.ops._dispatch`):

``reference``
    Dense, from the paper's equations; memory O(B H N^2). Plain autograd. The only backend with
    attention dropout.
``chunked``
    Memory-efficient: children are processed in blocks of rows, so only (B, H, c, N) blocks exist;
    the backward recomputes each block (see :mod:`._chunked`). Outputs and gradients equal the
    reference's to rounding. Any device, any float dtype.

``auto`` takes ``chunked`` (on 2 CPU cores it is as fast as the dense path at N=196 and faster at
N=1024, forward and backward; benchmarks/dependencyvit_cpu.md) unless attention dropout is active,
which only ``reference`` implements.

``chunked`` runs as the custom op ``torch.ops.visionzoo.reversed_attention`` (:mod:`._op`; fake kernel,
autograd, plain-aten path); ``reference`` as plain autograd ops. FLOPs: ``2 * B * H * N^2 * (Dk + Dv)`` per
call for either backend, the same as a standard attention (the reference's matmuls, the op's formula).
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from .._checks import check_tensors
from .._dispatch import call
from ._op import BACKENDS, RA, flops, reversed_attention_op

__all__ = ["reversed_attention", "reversed_attention_flops", "resolve", "BACKENDS"]

OP = "reversed_attention"


def reversed_attention_flops(batch: int, heads: int, length: int, head_dim: int,
                             v_head_dim: Optional[int] = None) -> int:
    """FLOPs (multiply-add = 2) of one reversed attention call: ``q k^T`` plus ``A^T v``."""
    return flops(batch, heads, length, head_dim, head_dim if v_head_dim is None else v_head_dim)


def resolve(requested: str, q: Tensor, dropout_p: float = 0.0) -> str:
    """The backend that runs for ``q`` (B, H, N, D) when ``requested`` is asked for."""
    return RA.select(requested, q, dropout_p=dropout_p)


def _validate(q, k, v, head_weight, message) -> None:
    check_tensors(OP, (("q", q), ("k", k), ("v", v), ("head_weight", head_weight), ("message", message)))
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be 4-d (batch, heads, N, head_dim), got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    if N < 1:
        raise ValueError(f"{OP}: need at least one token, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{OP}: k has shape {tuple(k.shape)}, expected q's shape {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{OP}: v must be (batch, heads, N, v_dim) = ({B}, {H}, {N}, *), got {tuple(v.shape)}")
    if head_weight is not None and head_weight.shape != (B, H, N):
        raise ValueError(f"{OP}: head_weight (p) must be (batch, heads, N) = ({B}, {H}, {N}), "
                         f"got {tuple(head_weight.shape)}")
    if message is not None and message.shape != (B, N):
        raise ValueError(f"{OP}: message (m) must be (batch, N) = ({B}, {N}), got {tuple(message.shape)}")


def reversed_attention(q: Tensor, k: Tensor, v: Tensor, head_weight: Optional[Tensor] = None,
                       message: Optional[Tensor] = None, *, scale: Optional[float] = None, dropout_p: float = 0.0,
                       return_dependency: bool = False, return_mass: bool = False, backend: str = "auto",
                       chunk_size: Optional[int] = None) -> Union[Tensor, tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """``(A^T * p * m) @ v`` with ``A = softmax(q k^T * scale)`` over parents (the key axis).

    Args:
        q, k: (B, H, N, D) child queries and parent keys.
        v: (B, H, N, Dv) values, sent by the children.
        head_weight: (B, H, N) head selector ``p`` per child (DependencyViT: a softmax over heads), or None.
        message: (B, N) message controller ``m`` per child (cumulative sigmoid gates), or None.
        scale: logit scale, default ``D ** -0.5``.
        dropout_p: dropout on ``A`` (reference backend only; pass 0 in eval).
        return_dependency: also return the dependency map ``sum_h A^T * p * m`` (B, N_parent, N_child).
        return_mass: also return the mass each parent receives, ``dependency.sum(-1)`` (B, N); costs
            O(B N) memory with the chunked backend.
        backend: ``"auto"``, ``"reference"`` or ``"chunked"``.
        chunk_size: rows per block for ``chunked`` (default: about 2**22 elements per block).

    Returns:
        ``out`` (B, H, N, Dv); or, if either flag is set, ``(out, dependency or None, mass or None)``.
        The dependency map and the mass are detached (no gradient).

    Raises:
        ValueError: bad shapes/dtypes/devices or an unknown backend.
        RuntimeError: a backend that cannot run (``chunked`` with dropout).
    """
    RA.check_name(backend)
    _validate(q, k, v, head_weight, message)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be >= 1, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    weight = head_weight
    if message is not None:
        m = message[:, None, :]
        weight = m.expand(q.shape[:3]) if weight is None else weight * m

    def run(b):
        if b.name == "reference":  # plain autograd ops; the only backend with attention dropout
            return b.forward(q, k, v, weight, scale, dropout_p, return_dependency, return_mass)
        out, dependency, mass = call(reversed_attention_op, q, k, v, weight, scale, chunk_size or 0,
                                     bool(return_dependency), bool(return_mass), backend)
        return out, dependency.detach() if return_dependency else None, mass.detach() if return_mass else None

    out, dependency, mass = RA.dispatch(backend, q, run, dropout_p=dropout_p)
    if return_dependency or return_mass:
        return out, dependency, mass
    return out
