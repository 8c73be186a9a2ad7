"""The ``chunked`` backend: BRA without the ``topk``-fold K/V copy of the whole image, and without any
full-size layout copy in the forward either.

It works on the spatial ``(B, H, W, C)`` tensors the model holds (e.g. the ``q``/``k``/``v`` channel
slices of one qkv projection), through strided views; nothing of the size of Q, K or V is copied in
the forward. Query regions are processed in chunks of whole region rows; for a chunk of ``n`` query
regions:

* its queries are copied to ``(B*n, w2, C_qk)`` (a chunk-sized copy);
* the tokens of the routed key/value regions are collected with one ``index_select`` each over a
  strided "one row per region" view of K/V (:func:`_region_rows`), ``(B*n, topk*w2, C)``: the official
  ``KVGather``, restricted to the chunk, as contiguous runs instead of per-element indexing;
* attention runs as one fused ``scaled_dot_product_attention`` call (heads split out, batch ``B*n``):
  PyTorch's flash kernel on CPU, so the ``(w2, topk*w2)`` scores are never written out;
* the result is written into its rows of the spatial output.

The chunk is sized so its gathered K/V stays within ``CHUNK_ELEMENTS`` (at least one region row): the
extra memory is a few MiB, instead of ``topk`` copies of K/V plus the scores (the official code).

Small grids (the routed keys are more than ~2/7 of all tokens, :func:`use_dense`) skip the gather:
one SDPA call over all tokens with the routing as a boolean token mask, which is exact (masked keys
get zero weight) and, on CPU, 2-3x faster than gathering at BiFormer's stage 3 at 224 and 448.

The backward recomputes each chunk's attention (flash-style: only Q/K/V and the routing are kept from
the forward), differentiates it with SDPA's backward, writes the Q gradient of the chunk's rows and
accumulates the K/V gradients of whole gathered regions with ``index_add_`` into region-major buffers,
laid out spatially at the end.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Gathered K/V elements allowed per chunk (module attribute so tests can shrink it to exercise many
# chunks); a chunk is at least one row of regions.
CHUNK_ELEMENTS = 1 << 21
# Dense masked attention instead of the gather when every query would see at least 1/DENSE_MAX_RATIO
# of all tokens anyway (H*W <= DENSE_MAX_RATIO * topk * w2). Measured on CPU (1 thread, batch 4): at
# ratio 3.06 (BiFormer's stage 3 at 224 and at 448 with n_win 7: 196 / 784 tokens, 64 / 256 routed keys)
# dense is 2-3x faster than the gather; at ratio 4 (stage 3 at 600x500 with n_win 8) 1.9x slower.
DENSE_MAX_RATIO = 3.5


def use_dense(H: int, W: int, topk: int, w2: int) -> bool:
    return H * W <= DENSE_MAX_RATIO * topk * w2


def _dense(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, m: int, n_h: int, n_w: int, scale: float) -> Tensor:
    """All tokens against all tokens with the routing as a boolean mask ``(B, 1, N, N)``: a key is allowed
    iff its region is among the query region's routed ones, so the softmax runs over exactly the routed
    tokens. Heads are strided views of the spatial tensors; returns ``(B, H, W, C_v)``."""
    B, H, W, c_qk = q.shape
    c_v, S2 = v.shape[-1], n_h * n_w
    rh, rw = H // n_h, W // n_w
    dev = idx.device
    allow = torch.zeros(B, S2, S2, dtype=torch.bool, device=dev).scatter_(2, idx, True)  # (B, S2 query, S2 key)
    # token (y, x) is in region (y // rh, x // rw): key regions -> key tokens by one gather, then query
    # regions -> query tokens by a broadcast copy of whole rows (a 9-d broadcast copy is several times slower)
    region = ((torch.arange(H, device=dev) // rh)[:, None] * n_w + torch.arange(W, device=dev)[None, :] // rw).view(-1)
    keys = allow.index_select(2, region)  # (B, S2, N)
    mask = keys.view(B, n_h, 1, n_w, 1, H * W).expand(B, n_h, rh, n_w, rw, H * W).reshape(B, 1, H * W, H * W)

    def heads(x: Tensor) -> Tensor:  # (B, H, W, m*d) -> (B, m, N, d) view
        return x.reshape(B, H * W, m, x.shape[-1] // m).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(B, H, W, c_v)


def _region_rows(x: Tensor, n_h: int, n_w: int) -> Tensor:
    """Spatial ``(B, H, W, C)`` -> strided view ``(U, rh, rw, C)`` in which region ``r`` of image ``b`` is row
    :func:`_row_numbers` ``(b, r)`` (no copy when ``x`` has the layout of a channel slice of a contiguous
    tensor, e.g. ``q``/``k``/``v`` of one qkv projection; other layouts are copied first).

    Row ``u = b*H*n_w + i*rh*n_w + j`` starts at ``u * rw * stride_w`` (region ``(i, j)``'s corner) because
    ``stride_h = W * stride_w`` and ``stride_b = H * stride_h``; rows that are not region corners exist in
    the view but are never read. The view lets one ``index_select`` gather whole regions.
    """
    B, H, W, C = x.shape
    if x.stride(-1) != 1 or x.stride(1) != W * x.stride(2) or (B > 1 and x.stride(0) != H * x.stride(1)):
        x = x.contiguous()
    s_h, s_w = x.stride(1), x.stride(2)
    rh, rw = H // n_h, W // n_w
    rows = (B - 1) * H * n_w + (n_h - 1) * rh * n_w + n_w
    return x.as_strided((rows, rh, rw, C), (rw * s_w, s_h, s_w, 1))


def _row_numbers(idx: Tensor, H: int, n_h: int, n_w: int) -> Tensor:
    """Region numbers ``idx`` ``(B, n, k)`` -> rows of :func:`_region_rows`, flattened ``(B*n*k,)``."""
    B = idx.shape[0]
    b = torch.arange(B, device=idx.device).view(B, 1, 1)
    return (b * (H * n_w) + (idx // n_w) * ((H // n_h) * n_w) + idx % n_w).reshape(-1)


def _chunk_rows(B: int, n_h: int, n_w: int, topk: int, w2: int, c_qk: int, c_v: int) -> int:
    """Region rows per chunk: gathered K/V of a chunk within ``CHUNK_ELEMENTS`` (at least one row)."""
    per_row = B * n_w * topk * w2 * (c_qk + c_v)
    return max(1, min(n_h, CHUNK_ELEMENTS // per_row))


def _heads(x: Tensor, m: int, copy: bool = True) -> Tensor:
    """``(b, L, m*d)`` -> ``(b, m, L, d)``: a contiguous copy (the backward's SDPA is faster on it) or, with
    ``copy=False``, the strided view (the forward: the flash kernel reads it as fast as a copy, measured on
    the AVX-512 Xeon, so the copy is pure cost)."""
    b, L, C = x.shape
    x = x.view(b, L, m, C // m).transpose(1, 2)
    return x.contiguous() if copy else x


def _queries(q: Tensor, n_h: int, n_w: int, i0: int, i1: int) -> Tensor:
    """Rows ``[i0, i1)`` of region-rows of spatial ``q`` -> ``(B*n, w2, C)`` (a chunk-sized copy)."""
    B, H, W, C = q.shape
    rh, rw = H // n_h, W // n_w
    x = q[:, i0 * rh:i1 * rh].reshape(B, i1 - i0, rh, n_w, rw, C).transpose(2, 3)
    return x.reshape(B * (i1 - i0) * n_w, rh * rw, C)


def _rows_view(x: Tensor, n_h: int, n_w: int, i0: int, i1: int) -> Tensor:
    """Rows ``[i0, i1)`` of spatial ``x`` as a writable view ``(B, n, rh, rw, C)`` ordered like
    :func:`_queries`."""
    B, H, W, C = x.shape
    rh, rw = H // n_h, W // n_w
    return x[:, i0 * rh:i1 * rh].view(B, i1 - i0, rh, n_w, rw, C).transpose(2, 3)


def bra_chunked(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_heads: int, n_h: int, n_w: int,
                scale: float) -> Tensor:
    """Spatial ``q``/``k`` ``(B, H, W, C_qk)``, ``v`` ``(B, H, W, C_v)``, routing ``idx`` ``(B, S2, topk)``
    -> ``(B, H, W, C_v)`` (contiguous). No autograd graph; see :func:`bra_chunked_backward`."""
    B, H, W, c_qk = q.shape
    c_v, topk, m = v.shape[-1], idx.shape[-1], num_heads
    rh, rw = H // n_h, W // n_w
    w2 = rh * rw
    if use_dense(H, W, topk, w2):
        return _dense(q, k, v, idx, m, n_h, n_w, scale).contiguous()
    kr, vr = _region_rows(k, n_h, n_w), _region_rows(v, n_h, n_w)
    out = v.new_empty(B, H, W, c_v)
    step = _chunk_rows(B, n_h, n_w, topk, w2, c_qk, c_v)
    for i0 in range(0, n_h, step):
        i1 = min(n_h, i0 + step)
        n = (i1 - i0) * n_w
        rows = _row_numbers(idx[:, i0 * n_w:i1 * n_w], H, n_h, n_w)
        o = F.scaled_dot_product_attention(
            _heads(_queries(q, n_h, n_w, i0, i1), m, copy=False),
            _heads(kr.index_select(0, rows).view(B * n, topk * w2, c_qk), m, copy=False),
            _heads(vr.index_select(0, rows).view(B * n, topk * w2, c_v), m, copy=False),
            scale=scale)  # (B*n, m, w2, d_v)
        _rows_view(out, n_h, n_w, i0, i1).copy_(o.transpose(1, 2).reshape(B, i1 - i0, n_w, rh, rw, c_v))
    return out


def _to_spatial(x: Tensor, B: int, H: int, W: int, n_h: int, n_w: int) -> Tensor:
    """Region-major rows ``(B*S2, w2*C)`` -> spatial ``(B, H, W, C)`` (contiguous)."""
    rh, rw = H // n_h, W // n_w
    return x.view(B, n_h, n_w, rh, rw, -1).transpose(2, 3).reshape(B, H, W, -1)


def bra_chunked_backward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_heads: int, n_h: int, n_w: int,
                         scale: float, grad_out: Tensor, needs: Tuple[bool, bool, bool]
                         ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients w.r.t. spatial ``q``, ``k``, ``v`` given ``grad_out`` ``(B, H, W, C_v)`` (``None`` where
    ``needs`` says so). K/V gradients are accumulated region-major (``index_add_`` of whole regions)
    and laid out spatially at the end."""
    B, H, W, c_qk = q.shape
    c_v, topk, m = v.shape[-1], idx.shape[-1], num_heads
    rh, rw = H // n_h, W // n_w
    S2, w2 = n_h * n_w, rh * rw
    if use_dense(H, W, topk, w2):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), needs)]
            out = _dense(*leaves, idx, m, n_h, n_w, scale)
            grads = iter(torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out))
        return tuple(next(grads) if need else None for need in needs)
    kr, vr = _region_rows(k, n_h, n_w), _region_rows(v, n_h, n_w)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if needs[0] else None
    dk = k.new_zeros(B * S2, w2 * c_qk) if needs[1] else None
    dv = v.new_zeros(B * S2, w2 * c_v) if needs[2] else None
    base = torch.arange(B, device=idx.device).view(B, 1, 1) * S2
    step = _chunk_rows(B, n_h, n_w, topk, w2, c_qk, c_v)
    for i0 in range(0, n_h, step):
        i1 = min(n_h, i0 + step)
        n = (i1 - i0) * n_w
        sel = idx[:, i0 * n_w:i1 * n_w]
        rows = _row_numbers(sel, H, n_h, n_w)
        qs = _queries(q, n_h, n_w, i0, i1).detach().requires_grad_(needs[0])
        ks = kr.index_select(0, rows).view(B * n, topk * w2, c_qk).requires_grad_(needs[1])
        vs = vr.index_select(0, rows).view(B * n, topk * w2, c_v).requires_grad_(needs[2])
        with torch.enable_grad():
            o = F.scaled_dot_product_attention(_heads(qs, m), _heads(ks, m), _heads(vs, m), scale=scale)
        go = _heads(_queries(grad_out, n_h, n_w, i0, i1), m)  # (B*n, m, w2, d_v)
        leaves = [x for x, need in zip((qs, ks, vs), needs) if need]
        grads = iter(torch.autograd.grad(o, leaves, go))
        dst = (base + sel).reshape(-1)  # region-major rows of the gathered regions
        if needs[0]:
            _rows_view(dq, n_h, n_w, i0, i1).copy_(next(grads).view(B, i1 - i0, n_w, rh, rw, c_qk))
        if needs[1]:
            dk.index_add_(0, dst, next(grads).reshape(-1, w2 * c_qk))
        if needs[2]:
            dv.index_add_(0, dst, next(grads).reshape(-1, w2 * c_v))
    return (dq, _to_spatial(dk, B, H, W, n_h, n_w) if needs[1] else None,
            _to_spatial(dv, B, H, W, n_h, n_w) if needs[2] else None)
