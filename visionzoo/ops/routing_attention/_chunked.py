"""The ``chunked`` backend: BRA without the ``topk``-fold K/V copy of the whole image.

Q, K and V are laid out region-major per head, ``(B, m, S2, w2, d)`` (one copy each). Query regions are
processed in chunks: for a chunk of ``n`` query regions, the K/V rows of their routed regions are
collected with one ``index_select`` of whole region rows (a contiguous memcpy per row, unlike the
official element-wise ``gather`` on an expanded view) into ``(B*m, n, topk*w2, d)``, and attention runs
as one fused ``scaled_dot_product_attention`` call (batch ``B*m``, "heads" ``n``) — PyTorch's flash
kernel on CPU, so the ``(w2, topk*w2)`` scores are never written out either. The chunk is sized so
the gathered K/V stays within ``max(kv_bytes, CHUNK_ELEMENTS)``; peak extra memory is therefore about
one more copy of K/V instead of ``topk`` copies.

The backward recomputes each chunk's attention (flash-style, nothing but Q/K/V and the routing is
kept from the forward), differentiates it with SDPA's backward and scatters the K/V gradients of the
gathered rows back with ``index_add_``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import flat_rows

# Gathered K/V elements allowed per chunk, beyond one copy of K/V (module attribute so tests can
# shrink it to exercise many chunks).
CHUNK_ELEMENTS = 1 << 22


def _chunk_regions(B: int, heads: int, S2: int, topk: int, w2: int, d_qk: int, d_v: int) -> int:
    per_region = B * heads * topk * w2 * (d_qk + d_v)
    budget = max(CHUNK_ELEMENTS, B * heads * S2 * w2 * (d_qk + d_v))
    return max(1, min(S2, budget // per_region))


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """(b, n, L, d) x (b, n, S, d) -> (b, n, L, d_v)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def bra_chunked(qh: Tensor, kh: Tensor, vh: Tensor, idx: Tensor, scale: float) -> Tensor:
    """Same contract as :func:`bra_reference` (region-major in and out), without an autograd graph;
    see :func:`bra_chunked_backward`."""
    B, m, S2, w2, d_qk = qh.shape
    d_v, topk = vh.shape[-1], idx.shape[-1]
    rows = flat_rows(idx, m, S2)  # (B, m, S2, topk)
    k_rows, v_rows = kh.reshape(B * m * S2, w2 * d_qk), vh.reshape(B * m * S2, w2 * d_v)
    chunk = _chunk_regions(B, m, S2, topk, w2, d_qk, d_v)
    if chunk >= S2:
        r = rows.reshape(-1)
        out = _attend(qh.reshape(B * m, S2, w2, d_qk),
                      k_rows.index_select(0, r).view(B * m, S2, topk * w2, d_qk),
                      v_rows.index_select(0, r).view(B * m, S2, topk * w2, d_v), scale)
        return out.view(B, m, S2, w2, d_v)
    out = qh.new_empty(B, m, S2, w2, d_v)
    for s in range(0, S2, chunk):
        e = min(S2, s + chunk)
        n = e - s
        r = rows[:, :, s:e].reshape(-1)
        out[:, :, s:e] = _attend(
            qh[:, :, s:e].reshape(B * m, n, w2, d_qk),
            k_rows.index_select(0, r).view(B * m, n, topk * w2, d_qk),
            v_rows.index_select(0, r).view(B * m, n, topk * w2, d_v), scale,
        ).view(B, m, n, w2, d_v)
    return out


def bra_chunked_backward(qh: Tensor, kh: Tensor, vh: Tensor, idx: Tensor, scale: float, grad_out: Tensor,
                         needs: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. region-major ``qh``, ``kh``, ``vh`` given ``grad_out`` ``(B, m, S2, w2, d_v)``
    (``None`` where ``needs`` says so)."""
    B, m, S2, w2, d_qk = qh.shape
    d_v, topk = vh.shape[-1], idx.shape[-1]
    rows = flat_rows(idx, m, S2)
    k_rows, v_rows = kh.reshape(B * m * S2, w2 * d_qk), vh.reshape(B * m * S2, w2 * d_v)
    dq = torch.empty_like(qh) if needs[0] else None
    dk = torch.zeros_like(k_rows) if needs[1] else None
    dv = torch.zeros_like(v_rows) if needs[2] else None
    chunk = _chunk_regions(B, m, S2, topk, w2, d_qk, d_v)
    for s in range(0, S2, chunk):
        e = min(S2, s + chunk)
        n = e - s
        r = rows[:, :, s:e].reshape(-1)
        qs = qh[:, :, s:e].reshape(B * m, n, w2, d_qk).detach().requires_grad_(needs[0])
        ks = k_rows.index_select(0, r).view(B * m, n, topk * w2, d_qk).requires_grad_(needs[1])
        vs = v_rows.index_select(0, r).view(B * m, n, topk * w2, d_v).requires_grad_(needs[2])
        with torch.enable_grad():
            out = _attend(qs, ks, vs, scale)
        leaves = [x for x, need in zip((qs, ks, vs), needs) if need]
        grads = iter(torch.autograd.grad(out, leaves, grad_out[:, :, s:e].reshape(B * m, n, w2, d_v)))
        if needs[0]:
            dq[:, :, s:e] = next(grads).view(B, m, n, w2, d_qk)
        if needs[1]:
            dk.index_add_(0, r, next(grads).reshape(-1, w2 * d_qk))
        if needs[2]:
            dv.index_add_(0, r, next(grads).reshape(-1, w2 * d_v))
    return (dq, dk.view_as(kh) if needs[1] else None, dv.view_as(vh) if needs[2] else None)
