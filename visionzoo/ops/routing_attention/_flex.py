"""``flex`` backend: BRA as FlexAttention over region-major tokens with a routing ``BlockMask``.

Tokens are put in region-major order (``to_regions``: token ``t`` belongs to region ``t // w2``), so the
routing "query region ``r`` sees key regions ``idx[b, r, :]``" is a block pattern of the
``(S2 * w2) x (S2 * w2)`` score matrix. The ``BlockMask`` is built from ``idx`` directly
(:func:`routing_block_mask`): a 128 x 128 tile is skipped when none of its (query region, key region)
pairs is routed, computed without ``mask_mod`` when all are, and masked token by token otherwise. Every
head shares the mask. Plain autograd (FlexAttention's own backward), outside the custom op, like
``reference``; the result equals ``reference`` (the same softmax over the same ``topk * w2`` keys).

On CUDA this is PyTorch's maintained FlexAttention kernel; on CPU it compiles to C++ (tens of seconds
per new shape) and is only run when asked for by name.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _flex
from ._common import from_regions, route, to_regions


def routing_block_mask(idx: Tensor, w2: int):
    """``BlockMask`` of BRA for routing ``idx`` ``(B, S2, topk)`` over ``S2`` regions of ``w2`` tokens."""
    B, S2, _ = idx.shape
    length = S2 * w2
    routed = torch.zeros(B, S2, S2, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
    inc = _flex.token_blocks(length, w2, idx.device)  # (tiles, S2)
    pairs = inc @ routed.float() @ inc.t()  # (B, tiles, tiles): routed (q region, k region) pairs per tile
    touched = inc.sum(1)
    full = pairs == touched[:, None] * touched[None, :]
    # A ragged last tile is never "full": its padding must go through mask_mod's bounds.
    if length % _flex.BLOCK:
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = (pairs > 0) & ~full
    last = S2 - 1

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, (q_idx // w2).clamp(max=last), (kv_idx // w2).clamp(max=last)]

    return _flex.block_mask(partial[:, None], full[:, None], mask_mod, length, length)


def bra_flex(q: Tensor, k: Tensor, v: Tensor, num_heads: int, n_h: int, n_w: int, topk: int,
             scale: float) -> tuple[Tensor, Tensor]:
    """Spatial ``q``, ``k`` ``(B, H, W, C_qk)``, ``v`` ``(B, H, W, C_v)`` -> ``(out (B, H, W, C_v), idx)``."""
    B, H, W, _ = q.shape
    idx = route(q, k, n_h, n_w, topk, scale)
    qh, kh, vh = (to_regions(x, n_h, n_w, num_heads) for x in (q, k, v))  # (B, m, S2, w2, d)
    S2, w2 = qh.shape[2], qh.shape[3]
    out = _flex.flex_attention(*(x.flatten(2, 3) for x in (qh, kh, vh)), routing_block_mask(idx, w2), scale)
    return from_regions(out.unflatten(2, (S2, w2)), n_h, n_w, H, W), idx
