"""The ``reference`` backend: the official dense-then-mask computation (lim142857/Sparsifiner,
``src/models/sparsifiner.py``, ``Attention.forward``).

The full score matrix ``(q @ k^T) * scale`` is computed, every connection not kept is filled with
``-inf``, the softmax runs over all ``N`` keys and ``nan_to_num`` clears rows that were left without any
key (the official code needs it when token pruning masks whole rows; with index sets, which always
hold at least one key, it never fires but is kept for fidelity). Cost: the dense attention plus the
mask. It defines the semantics every other backend is tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(idx: Tensor, num_keys: int, dense_rows: int) -> Tensor:
    """``idx`` ``(B, H, N - P, K)`` -> boolean connectivity ``(B, H, N, N)``; the first ``P`` rows are all True."""
    B, H, M, _ = idx.shape
    # Out of place, with a tensor source: exporters take it (ONNX ScatterElements), not an in-place
    # scatter of a Python bool into a slice.
    rows = torch.zeros(B, H, M, num_keys, dtype=torch.bool, device=idx.device)
    rows = rows.scatter(-1, idx, torch.ones_like(idx, dtype=torch.bool))
    return torch.cat([rows.new_ones(B, H, dense_rows, num_keys), rows], dim=2)


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float,
                               dense_rows: int) -> Tensor:
    """``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)``, ``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, d_v)``.
    Plain autograd ops (differentiable in q, k, v)."""
    mask = keep_mask(idx, k.shape[-2], dense_rows)  # (B, H, N, N)
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    attn = attn.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    attn = torch.nan_to_num(attn)
    return attn @ v
