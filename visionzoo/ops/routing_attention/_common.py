"""Layout helpers and the routing step shared by every BRA backend.

Token layouts used here (``S2 = n_h * n_w`` regions of ``w2 = (H / n_h) * (W / n_w)`` tokens):

* spatial:       ``(B, H, W, C)``, what the model holds;
* region-major:  ``(B, m, S2, w2, d)`` with ``C = m * d`` split head-major, as the official code splits
  channels (``'(m c)'``): the layout every fast backend works in, one contiguous copy per tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_regions(x: Tensor, n_h: int, n_w: int, heads: int) -> Tensor:
    """``(B, H, W, m*d)`` -> ``(B, m, S2, w2, d)`` (contiguous)."""
    B, H, W, C = x.shape
    rh, rw, d = H // n_h, W // n_w, C // heads
    x = x.reshape(B, n_h, rh, n_w, rw, heads, d)
    return x.permute(0, 5, 1, 3, 2, 4, 6).reshape(B, heads, n_h * n_w, rh * rw, d)


def from_regions(x: Tensor, n_h: int, n_w: int, H: int, W: int) -> Tensor:
    """``(B, m, S2, w2, d)`` -> ``(B, H, W, m*d)`` (contiguous)."""
    B, m, _, _, d = x.shape
    rh, rw = H // n_h, W // n_w
    x = x.reshape(B, m, n_h, n_w, rh, rw, d)
    return x.permute(0, 2, 4, 3, 5, 1, 6).reshape(B, H, W, m * d)


@torch.no_grad()
def route(qh: Tensor, kh: Tensor, topk: int, scale: float) -> Tensor:
    """Region-level routing: the ``topk`` key regions of every query region, ``(B, S2, topk)`` int64.

    ``qh``/``kh`` are region-major ``(B, m, S2, w2, d)``. Region means are taken over the region's tokens
    and compared over all ``m * d`` channels (no heads), scaled by the same ``scale`` as the token
    attention. Routing is never differentiated (the official ``diff_routing=False``; the official
    routing weights, a softmax over the top-k logits, are computed there but unused).
    """
    B, m, S2, _, d = qh.shape
    q_r = qh.mean(3).transpose(1, 2).reshape(B, S2, m * d)  # (B, S2, C_qk)
    k_r = kh.mean(3).transpose(1, 2).reshape(B, S2, m * d)
    logits = (q_r * scale) @ k_r.transpose(-2, -1)  # (B, S2, S2)
    return torch.topk(logits, k=topk, dim=-1).indices


def flat_rows(idx: Tensor, heads: int, num_regions: int) -> Tensor:
    """Routing indices ``(B, n, k)`` -> ``(B, m, n, k)`` row numbers in ``x.reshape(B*m*S2, -1)`` for a
    region-major ``x`` ``(B, m, S2, w2, d)``: ``(b*m + h) * S2 + idx[b, i, j]``."""
    B = idx.shape[0]
    base = torch.arange(B * heads, device=idx.device).view(B, heads, 1, 1) * num_regions
    return base + idx.unsqueeze(1)
