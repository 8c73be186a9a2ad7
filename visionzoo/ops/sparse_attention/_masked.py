"""The ``masked`` backend: one fused ``scaled_dot_product_attention`` call with the connectivity as an
additive float ``attn_mask`` (``0`` where a key is kept, ``-inf`` elsewhere).

Same arithmetic as the reference (every score is still computed), but fused: PyTorch's flash kernel
(CPU and CUDA) never writes the ``(N, N)`` score or probability matrices out, applies the mask while
it streams over key blocks and needs no separate softmax, ``masked_fill`` or ``nan_to_num`` passes.
On CPU it is the fastest exact route measured here (``benchmarks/sparsifiner_cpu.md``): a kept set of
25% of the keys is unstructured, so there are no whole blocks to skip, and gathering 25% of the keys
per query is memory-bound where the dense tile product is compute-bound.

The mask is built directly in the query dtype (one fill, one scatter): SDPA turns a *boolean* mask into
an additive one itself, with two extra ``where`` passes over the ``(B, H, N, N)`` map, which cost as
much as the attention at 577 tokens on CPU. ``scores + 0`` is exact, so the result is the same.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def additive_mask(idx: Tensor, num_keys: int, dense_rows: int, dtype: torch.dtype) -> Tensor:
    """``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, N)``: ``0`` at kept keys (every key of the first ``P`` rows),
    ``-inf`` elsewhere."""
    B, H, M, _ = idx.shape
    mask = torch.full((B, H, dense_rows + M, num_keys), float("-inf"), dtype=dtype, device=idx.device)
    mask[:, :, :dense_rows] = 0.0
    mask[:, :, dense_rows:].scatter_(-1, idx, 0.0)
    return mask


def sparse_attention_masked(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int) -> Tensor:
    mask = additive_mask(idx, k.shape[-2], dense_rows, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sparse_attention_masked_backward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int,
                                     grad_out: Tensor, needs: Tuple[bool, bool, bool]
                                     ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Recompute the fused forward under autograd and differentiate it (SDPA's own backward)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), needs)]
        out = sparse_attention_masked(*leaves, idx, scale, dense_rows)
        grads = iter(torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out))
    return tuple(next(grads) if need else None for need in needs)
