"""The ``gather`` backend: only the kept connections are computed.

For every query row ``i >= P`` the ``K`` keys and values it keeps are collected with one
``index_select`` on the flattened ``(B*H*N, d)`` K and V, giving ``(B, H, m, K, d)`` for a chunk of
``m`` query rows, and attention runs over those ``K`` entries only: ``(1 x d) @ (d x K)`` scores,
softmax, ``(1 x K) @ (K x d_v)``. That is ``K / N`` of the dense multiply-adds (25% at the paper's keep
rate), at the price of a gathered copy of K and V per query: the memory traffic is ``K`` key rows per
query, which is why this loses to the fused dense ``masked`` backend on CPU at these sizes (see
``benchmarks/sparsifiner_cpu.md``). The ``P`` dense rows (the class token) run as one small SDPA call.

Query rows are processed in chunks so the gathered copy stays under ``CHUNK_ELEMENTS`` elements. The
backward recomputes each chunk under autograd and scatters the K/V gradients of the gathered rows
back with ``index_add_`` (nothing but q, k, v and the indices is kept from the forward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Gathered K+V elements allowed per chunk (module attribute so tests can shrink it).
CHUNK_ELEMENTS = 1 << 23


def _rows(idx: Tensor, num_keys: int) -> Tensor:
    """``idx`` ``(B, H, m, K)`` -> row numbers in ``x.reshape(B*H*N, d)``: ``(b*H + h) * N + idx``."""
    B, H = idx.shape[:2]
    base = torch.arange(B * H, device=idx.device).view(B, H, 1, 1) * num_keys
    return base + idx


def _chunk(B: int, H: int, M: int, K: int, d: int, d_v: int) -> int:
    return max(1, min(M, CHUNK_ELEMENTS // max(1, B * H * K * (d + d_v))))


def _attend_rows(q: Tensor, k_sel: Tensor, v_sel: Tensor, scale: float) -> Tensor:
    """``q`` ``(B, H, m, d)``, ``k_sel`` ``(B, H, m, K, d)``, ``v_sel`` ``(B, H, m, K, d_v)`` -> ``(B, H, m, d_v)``."""
    scores = (q.unsqueeze(-2) @ k_sel.transpose(-2, -1)) * scale  # (B, H, m, 1, K)
    return (scores.softmax(dim=-1) @ v_sel).squeeze(-2)


def sparse_attention_gather(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int) -> Tensor:
    B, H, N, d = q.shape
    d_v, M, K = v.shape[-1], idx.shape[2], idx.shape[3]
    out = q.new_empty(B, H, N, d_v, dtype=v.dtype)
    P = dense_rows
    if P:
        out[:, :, :P] = F.scaled_dot_product_attention(q[:, :, :P], k, v, scale=scale)
    k_flat, v_flat = k.reshape(B * H * N, d), v.reshape(B * H * N, d_v)
    rows = _rows(idx, N)
    step = _chunk(B, H, M, K, d, d_v)
    for s in range(0, M, step):
        e = min(M, s + step)
        r = rows[:, :, s:e].reshape(-1)
        k_sel = k_flat.index_select(0, r).view(B, H, e - s, K, d)
        v_sel = v_flat.index_select(0, r).view(B, H, e - s, K, d_v)
        out[:, :, P + s:P + e] = _attend_rows(q[:, :, P + s:P + e], k_sel, v_sel, scale)
    return out


def sparse_attention_gather_backward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                                     grad_out: Tensor, needs: Tuple[bool, bool, bool]
                                     ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    B, H, N, d = q.shape
    d_v, M, K = v.shape[-1], idx.shape[2], idx.shape[3]
    P = dense_rows
    dq = torch.zeros_like(q) if needs[0] else None
    dk = torch.zeros(B * H * N, d, dtype=k.dtype, device=k.device) if needs[1] else None
    dv = torch.zeros(B * H * N, d_v, dtype=v.dtype, device=v.device) if needs[2] else None
    if P:
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip((q[:, :, :P], k, v), needs)]
            out = F.scaled_dot_product_attention(*leaves, scale=scale)
            grads = iter(torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out[:, :, :P]))
        if needs[0]:
            dq[:, :, :P] = next(grads)
        if needs[1]:
            dk += next(grads).reshape(-1, d)
        if needs[2]:
            dv += next(grads).reshape(-1, d_v)
    k_flat, v_flat = k.reshape(B * H * N, d), v.reshape(B * H * N, d_v)
    rows = _rows(idx, N)
    step = _chunk(B, H, M, K, d, d_v)
    for s in range(0, M, step):
        e = min(M, s + step)
        m = e - s
        r = rows[:, :, s:e].reshape(-1)
        qs = q[:, :, P + s:P + e].detach().requires_grad_(needs[0])
        ks = k_flat.index_select(0, r).view(B, H, m, K, d).requires_grad_(needs[1])
        vs = v_flat.index_select(0, r).view(B, H, m, K, d_v).requires_grad_(needs[2])
        with torch.enable_grad():
            out = _attend_rows(qs, ks, vs, scale)
            leaves = [x for x, need in zip((qs, ks, vs), needs) if need]
            grads = iter(torch.autograd.grad(out, leaves, grad_out[:, :, P + s:P + e]))
        if needs[0]:
            dq[:, :, P + s:P + e] = next(grads)
        if needs[1]:
            dk.index_add_(0, r, next(grads).reshape(-1, d))
        if needs[2]:
            dv.index_add_(0, r, next(grads).reshape(-1, d_v))
    return (dq, dk.view_as(k) if needs[1] else None, dv.view_as(v) if needs[2] else None)
