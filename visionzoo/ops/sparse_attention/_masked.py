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
much as the attention at 577 tokens on CPU. ``scores + 0`` is exact, so the result is the same. On
CPU without gradients the mask lives in a buffer reused between calls (``REUSE_CPU_BUFFER``).
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


# CPU inference reuses one mask buffer per thread (see _buffer); False: a fresh tensor every call.
REUSE_CPU_BUFFER = True
_local = threading.local()


def _buffer(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, reuse: bool) -> Tensor:
    """An uninitialised tensor of ``shape``. With ``reuse`` (CPU, nothing needs a gradient) it is a view
    of a per-thread buffer kept between calls: a map of ``B*H*N*N`` elements is too big for the C
    allocator's heap (64 MB at 577 tokens, batch 8), so a fresh one is new ``mmap`` pages every call,
    and faulting them in cost several times the ``fill`` itself on the test machine."""
    if not (reuse and REUSE_CPU_BUFFER and device.type == "cpu"):
        return torch.empty(shape, dtype=dtype, device=device)
    key = (dtype, torch.is_inference_mode_enabled())
    cache = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def additive_mask(idx: Tensor, num_keys: int, dense_rows: int, dtype: torch.dtype, reuse: bool = False) -> Tensor:
    """``idx`` ``(B, H, N - P, K)`` -> ``(B, H, N, N)``: ``0`` at kept keys (every key of the first ``P`` rows),
    ``-inf`` elsewhere. ``reuse``: the result may be a reused CPU buffer (valid until the next call)."""
    B, H, M, _ = idx.shape
    mask = _buffer((B, H, dense_rows + M, num_keys), dtype, idx.device, reuse).fill_(float("-inf"))
    mask[:, :, :dense_rows] = 0.0
    mask[:, :, dense_rows:].scatter_(-1, idx, 0.0)
    return mask


def sparse_attention_masked(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, dense_rows: int) -> Tensor:
    reuse = not any(x.requires_grad for x in (q, k, v))
    mask = additive_mask(idx, k.shape[-2], dense_rows, q.dtype, reuse=reuse)
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
