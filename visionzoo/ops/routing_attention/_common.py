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
def route(q: Tensor, k: Tensor, n_h: int, n_w: int, topk: int, scale: float) -> Tensor:
    """Region-level routing: the ``topk`` key regions of every query region, ``(B, S2, topk)`` int64.

    ``q``/``k`` are spatial ``(B, H, W, C_qk)`` (any strides). Region means are taken over the region's
    tokens and compared over all ``C_qk`` channels (no heads), scaled by the same ``scale`` as the token
    attention; regions are numbered row-major over the ``n_h x n_w`` grid. Routing is never
    differentiated (the official ``diff_routing=False``; the official routing weights, a softmax over
    the top-k logits, are computed there but unused).
    """
    B, H, W, C = q.shape

    def means(x: Tensor) -> Tensor:  # (B, S2, C): sum over region rows, then columns (fast reductions)
        rows = x.reshape(B, n_h, H // n_h, W, C).sum(2)  # (B, n_h, W, C)
        return rows.view(B, n_h, n_w, W // n_w, C).sum(3).reshape(B, n_h * n_w, C) / ((H // n_h) * (W // n_w))

    logits = (means(q) * scale) @ means(k).transpose(-2, -1)  # (B, S2, S2)
    return torch.topk(logits, k=topk, dim=-1).indices
