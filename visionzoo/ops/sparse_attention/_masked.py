"""The ``masked`` backend: one fused ``scaled_dot_product_attention`` call with the boolean
connectivity as ``attn_mask``.

Same arithmetic as the reference (every score is still computed), but fused: PyTorch's flash kernel
(CPU and CUDA) never writes the ``(N, N)`` score or probability matrices out, applies the mask while
it streams over key blocks and needs no separate softmax, ``masked_fill`` or ``nan_to_num`` passes.
On CPU it is the fastest exact route measured here (``benchmarks/sparsifiner_cpu.md``): a kept set of
25% of the keys is unstructured, so there are no whole blocks to skip, and gathering 25% of the keys
per query is memory-bound where the dense tile product is compute-bound.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._reference import keep_mask


def sparse_attention_masked(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int) -> Tensor:
    mask = keep_mask(idx, k.shape[-2], dense_rows)
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
