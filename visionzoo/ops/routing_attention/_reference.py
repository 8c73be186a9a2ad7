"""The ``reference`` backend: the official BRA algorithm (rayleizhu/BiFormer ``ops/bra_legacy.py``).

Every query region gathers the keys and values of its ``topk`` routed regions into a ``topk``-fold
redundant tensor ``(B, S2, topk, w2, C_qk + C_v)`` (the official ``KVGather``: ``torch.gather`` on an
expanded view) and runs dense softmax attention against it, one batch entry per (image, region), with
explicit ``softmax((q * scale) @ k^T) @ v``. It defines the semantics; its memory is ``topk`` times that
of K and V, which is what the other backends avoid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def bra_reference(qh: Tensor, kh: Tensor, vh: Tensor, idx: Tensor, scale: float, return_lse: bool = False):
    """Region-major ``qh``, ``kh`` ``(B, m, S2, w2, d_qk)``, ``vh`` ``(B, m, S2, w2, d_v)`` and routing
    ``idx`` ``(B, S2, topk)`` -> ``(B, m, S2, w2, d_v)``. Differentiable with autograd.

    ``return_lse=True`` also returns the base-2 log-sum-exp of each query's scaled scores,
    ``(B, m, S2, w2, 1)`` fp32 (the row statistic the Triton kernel keeps for its backward)."""
    B, m, S2, w2, d_qk = qh.shape
    d_v, topk = vh.shape[-1], idx.shape[-1]
    c_qk, c_v = m * d_qk, m * d_v
    C = c_qk + c_v

    # The official layout: channels-last per region, heads folded into channels.
    def flat(x: Tensor) -> Tensor:  # (B, m, S2, w2, d) -> (B, S2, w2, m*d)
        return x.permute(0, 2, 3, 1, 4).reshape(B, S2, w2, -1)

    kv_pix = torch.cat([flat(kh), flat(vh)], dim=-1)  # (B, S2, w2, C_qk + C_v)
    kv_sel = torch.gather(
        kv_pix.view(B, 1, S2, w2, C).expand(-1, S2, -1, -1, -1),  # (B, S2, S2, w2, C), no copy
        dim=2,
        index=idx.view(B, S2, topk, 1, 1).expand(-1, -1, -1, w2, C),
    )  # (B, S2, topk, w2, C): the topk-fold copy
    k_sel, v_sel = kv_sel.split([c_qk, c_v], dim=-1)
    k_sel = k_sel.reshape(B, S2, topk, w2, m, d_qk).permute(0, 1, 4, 5, 2, 3).reshape(B * S2, m, d_qk, topk * w2)
    v_sel = v_sel.reshape(B, S2, topk, w2, m, d_v).permute(0, 1, 4, 2, 3, 5).reshape(B * S2, m, topk * w2, d_v)
    q_pix = qh.transpose(1, 2).reshape(B * S2, m, w2, d_qk)

    logits = (q_pix * scale) @ k_sel  # (B*S2, m, w2, topk*w2)
    out = torch.softmax(logits, dim=-1) @ v_sel  # (B*S2, m, w2, d_v)
    out = out.view(B, S2, m, w2, d_v).transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.logsumexp(logits.float(), dim=-1) * math.log2(math.e)  # (B*S2, m, w2)
    return out, lse.view(B, S2, m, w2, 1).transpose(1, 2)
