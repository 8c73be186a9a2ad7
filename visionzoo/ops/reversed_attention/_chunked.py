"""``chunked`` backend: reversed attention that never holds the (B, H, N, N) matrix.

Reversed attention transposes the attention matrix, but the softmax still normalises each *child*
row ``i`` over all parents ``j``. Cutting the children (the queries) into blocks of ``c`` rows
therefore gives complete softmax rows per block, and no running softmax statistics are needed:

    forward, per block I:  A_I = softmax(q_I k^T * scale)                (B, H, c, N)
                           out += (A_I * w_I)^T v_I                     (B, H, N, Dv)   scatter to parents
                           mass += sum_{h, i in I} A_I * w_I            (B, N)          optional
                           dependency[:, :, I] = sum_h (A_I * w_I)^T     (B, N, c)       optional

The backward recomputes ``A_I`` block by block (the forward saves only q, k, v, w). With G = dL/dout
and W_I = A_I * w_I (w broadcast over parents):

    dv_I = W_I G                         dW_I = v_I G^T                   (B, H, c, N)
    dw_I = rowsum(A_I * dW_I)            dA_I = w_I * dW_I
    dS_I = A_I * (dA_I - w_I * dw_I)     (rowsum(A_I * dA_I) = w_I * dw_I)
    dq_I = scale * dS_I k                dk  += scale * dS_I^T q_I

Peak extra memory is two (B, H, c, N) blocks (softmax, scaling and the backward's products run in
place; ``dv_I = w_I * (A_I G)`` needs no weighted copy); ``c`` is chosen so a block holds about
``2**20`` elements (4 MiB in fp32) unless ``chunk_size`` is given. All products are ``matmul``s, so
``FlopCounterMode`` counts the forward exactly like the dense path (2 * B * H * N^2 * (Dk + Dv) FLOPs);
the backward's recomputation adds one ``q k^T`` per block on top of the dense backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CHUNK_ELEMENTS = 2 ** 20


def default_chunk_size(batch: int, heads: int, length: int) -> int:
    """Rows per block so that one (B, H, c, N) block holds about ``CHUNK_ELEMENTS`` elements (multiple of 16)."""
    rows = CHUNK_ELEMENTS // max(1, batch * heads * length)
    return max(16, (rows // 16) * 16)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _block_probs(q_blk: Tensor, k_t: Tensor, scale: float) -> Tensor:
    """softmax(q_blk k^T * scale) over parents, computed in place in one (B, H, c, N) buffer."""
    probs = torch.matmul(q_blk, k_t)  # (B, H, c, N)
    probs.mul_(scale)
    probs.sub_(probs.amax(dim=-1, keepdim=True))
    probs.exp_()
    probs.div_(probs.sum(dim=-1, keepdim=True))
    return probs


def reversed_attention_chunked(q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], scale: float, chunk: int,
                               return_dependency: bool, return_mass: bool
                               ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Block-wise reversed attention on validated inputs; same shapes and outputs as the reference.
    ``chunk``: rows per block, 0 for :func:`default_chunk_size`."""
    B, H, N, _ = q.shape
    chunk = chunk or default_chunk_size(B, H, N)
    acc = _acc_dtype(v)
    out = v.new_zeros((B, H, N, v.shape[-1]), dtype=acc)
    dependency = q.new_zeros((B, N, N)) if return_dependency else None
    mass = q.new_zeros((B, N), dtype=acc) if return_mass else None
    k_t = k.transpose(-2, -1)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        sent = _block_probs(q[:, :, s:e], k_t, scale)  # A_I, then A_I * w_I (B, H, c, N)
        if weight is not None:
            sent.mul_(weight[:, :, s:e, None])
        out += torch.matmul(sent.transpose(-2, -1), v[:, :, s:e]).to(acc)  # (B, H, N, Dv)
        if return_dependency or return_mass:
            dep = sent.sum(dim=1)  # (B, c, N): child i -> parent j
            if return_dependency:
                dependency[:, :, s:e] = dep.transpose(-2, -1)
            if return_mass:
                mass += dep.sum(dim=1).to(acc)
    return out.to(v.dtype), dependency, mass.to(q.dtype) if mass is not None else None


def reversed_attention_chunked_backward(q: Tensor, k: Tensor, v: Tensor, weight: Optional[Tensor], scale: float,
                                        chunk: int, grad_out: Optional[Tensor], needs: tuple
                                        ) -> tuple[Optional[Tensor], ...]:
    """Gradients of ``(q, k, v, weight)`` (``needs``: which are wanted), recomputing each block."""
    need_q, need_k, need_v, need_w = needs
    need_w = need_w and weight is not None
    B, H, N, _ = q.shape
    chunk = chunk or default_chunk_size(B, H, N)
    dq = torch.empty_like(q) if need_q else None
    dk = torch.zeros_like(k, dtype=_acc_dtype(k)) if need_k else None
    dv = torch.empty_like(v) if need_v else None
    dw = torch.empty_like(weight) if need_w else None
    if grad_out is None:
        grad_out = v.new_zeros((B, H, N, v.shape[-1]))
    grad_out = grad_out.to(v.dtype)
    g_t = grad_out.transpose(-2, -1)  # (B, H, Dv, N)
    k_t = k.transpose(-2, -1)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        q_blk = q[:, :, s:e]
        w_blk = weight[:, :, s:e, None] if weight is not None else None  # (B, H, c, 1)
        probs = _block_probs(q_blk, k_t, scale)  # A_I (B, H, c, N)
        if need_v:  # dv_I = (A_I * w_I) G = w_I * (A_I G)
            dv_blk = torch.matmul(probs, grad_out)
            dv[:, :, s:e] = dv_blk * w_blk if w_blk is not None else dv_blk
        if not (need_q or need_k or need_w):
            continue
        d_scores = torch.matmul(v[:, :, s:e], g_t)  # dW_I (B, H, c, N)
        d_scores.mul_(probs)  # A_I * dW_I
        dw_blk = d_scores.sum(dim=-1, keepdim=True)  # (B, H, c, 1)
        if need_w:
            dw[:, :, s:e] = dw_blk.squeeze(-1)
        if need_q or need_k:
            d_scores.addcmul_(probs, dw_blk, value=-1.0)  # A_I * (dW_I - dw_I)
            d_scores.mul_(w_blk * scale if w_blk is not None else scale)  # dS_I
            if need_q:
                dq[:, :, s:e] = torch.matmul(d_scores, k)
            if need_k:
                dk += torch.matmul(d_scores.transpose(-2, -1), q_blk).to(dk.dtype)
    if dk is not None:
        dk = dk.to(k.dtype)
    return dq, dk, dv, dw
