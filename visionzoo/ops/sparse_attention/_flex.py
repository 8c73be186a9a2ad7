"""``flex`` backend: Sparsifiner's sparse attention as FlexAttention with the kept connections as its mask.

The ``mask_mod`` reads the boolean connectivity :func:`keep_mask` ``(B, H, N, N)`` (dense rows first,
then each row's ``idx`` keys). The key sets are per query token (a top-k of the connectivity
predictor), so nearly every 128 x 128 tile of the score matrix holds some kept key: every tile is marked
partial and the saving over dense attention is the fused, memory-light kernel rather than skipped tiles.
Plain autograd (FlexAttention's own backward), outside the custom op, like ``reference``.

On CUDA this is PyTorch's maintained FlexAttention kernel; on CPU it compiles to C++ (tens of seconds
per new shape) and is only run when asked for by name.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _flex
from ._reference import keep_mask


def sparse_block_mask(idx: Tensor, num_keys: int, dense_rows: int):
    """``BlockMask`` for key sets ``idx`` ``(B, H, N - P, K)`` over ``num_keys`` keys, ``P = dense_rows``."""
    B, H = idx.shape[:2]
    keep = keep_mask(idx, num_keys, dense_rows)  # (B, H, N, N)
    tiles = -(-num_keys // _flex.BLOCK)
    partial = torch.ones(B, H, tiles, tiles, dtype=torch.bool, device=idx.device)
    last = num_keys - 1

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, h, q_idx.clamp(max=last), kv_idx.clamp(max=last)]

    return _flex.block_mask(partial, None, mask_mod, num_keys, num_keys)


def sparse_attention_flex(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int) -> Tensor:
    """``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)``, ``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, d_v)``."""
    return _flex.flex_attention(q, k, v, sparse_block_mask(idx, k.shape[-2], dense_rows), scale)
