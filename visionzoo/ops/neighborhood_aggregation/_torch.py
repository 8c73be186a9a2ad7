"""Pure-PyTorch fast backends: ``dense`` (small maps) and ``taps`` (large maps), with explicit backwards.

``dense``
    Scatters each (image, group)'s weights into an ``(H*W, H*W)`` matrix (zero outside the window) and
    runs one batched matmul; the backward is two more matmuls and a gather. The matrix holds ``H*W``
    entries per pixel instead of the ``K*K*c`` of a gathered window tensor, so it is leaner than the
    reference whenever ``H*W < K*K*c`` and wastes at most ``H*W / (K*K)`` in MACs. OverLoCK at 224 runs
    ContMix on 14x14 maps with 13x13 windows and on 7x7 maps with 7x7 windows, where the matrix is
    1.2x and 1x dense: one GEMM is the whole op.
``taps``
    Loops over the ``K*K`` taps: per window row ``a`` it gathers the value rows ``s(i) + a``, per column
    tap the columns ``s(j) + b``, and accumulates ``weight * value`` in place. Extra memory is two
    value-sized buffers whatever ``K`` (the reference holds ``K*K`` copies); the backward recomputes the
    same slices and scatters with ``index_add_`` (deterministic on CPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import flat_keys, window_keys

# ``torch`` picks ``dense`` while the dense matrix costs at most this many times the op's own MACs.
DENSE_MAX_WASTE = 8


def use_dense(height: int, width: int, kernel_size: int) -> bool:
    return height * width <= DENSE_MAX_WASTE * kernel_size * kernel_size


def _dense_matrix(attn: Tensor, keys: Tensor) -> Tensor:
    """``attn`` ``(B, G, N, K*K)``, ``keys`` ``(N, K*K)`` -> ``(B, G, N, N)`` with the weights at their keys."""
    B, G, N, KK = attn.shape
    mat = attn.new_zeros(B, G, N, N)
    return mat.scatter_(3, keys.view(1, 1, N, KK).expand(B, G, N, KK), attn)


def dense_forward(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    B, G, H, W, c = value.shape
    keys = flat_keys(H, W, kernel_size, value.device)
    mat = _dense_matrix(attn.reshape(B, G, H * W, -1), keys)  # (B, G, N, N)
    return (mat @ value.reshape(B, G, H * W, c)).view(B, G, H, W, c)


def dense_backward(attn: Tensor, value: Tensor, kernel_size: int, grad_out: Tensor,
                   needs: Tuple[bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    B, G, H, W, c = value.shape
    N, KK = H * W, kernel_size * kernel_size
    keys = flat_keys(H, W, kernel_size, value.device)
    g = grad_out.reshape(B, G, N, c)
    grad_attn = grad_value = None
    if needs[0]:
        full = g @ value.reshape(B, G, N, c).transpose(-1, -2)  # (B, G, N, N): d out[n] . value[m]
        grad_attn = full.gather(3, keys.view(1, 1, N, KK).expand(B, G, N, KK)).view(attn.shape)
    if needs[1]:
        mat = _dense_matrix(attn.reshape(B, G, N, KK), keys)
        grad_value = (mat.transpose(-1, -2) @ g).view(value.shape)
    return grad_attn, grad_value


def taps_forward(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    B, G, H, W, c = value.shape
    K = kernel_size
    rows, cols = window_keys(H, K, value.device), window_keys(W, K, value.device)
    taps = attn.permute(4, 0, 1, 2, 3).unsqueeze(-1).contiguous()  # (K*K, B, G, H, W, 1)
    out = torch.zeros_like(value)
    for a in range(K):
        vr = value.index_select(2, rows[:, a])  # (B, G, H, W, c): value row s(i) + a for output row i
        for b in range(K):
            out.addcmul_(taps[a * K + b], vr.index_select(3, cols[:, b]))
    return out


def taps_backward(attn: Tensor, value: Tensor, kernel_size: int, grad_out: Tensor,
                  needs: Tuple[bool, bool]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    B, G, H, W, c = value.shape
    K = kernel_size
    rows, cols = window_keys(H, K, value.device), window_keys(W, K, value.device)
    taps = attn.permute(4, 0, 1, 2, 3).unsqueeze(-1).contiguous()  # (K*K, B, G, H, W, 1)
    grad_taps = attn.new_empty(K * K, B, G, H, W) if needs[0] else None
    grad_value = torch.zeros_like(value) if needs[1] else None
    for a in range(K):
        vr = value.index_select(2, rows[:, a]) if needs[0] else None
        per_row = torch.zeros_like(value) if needs[1] else None
        for b in range(K):
            t = a * K + b
            if needs[0]:
                torch.sum(vr.index_select(3, cols[:, b]) * grad_out, dim=-1, out=grad_taps[t])
            if needs[1]:
                per_row.index_add_(3, cols[:, b], taps[t] * grad_out)
        if needs[1]:
            grad_value.index_add_(2, rows[:, a], per_row)
    grad_attn = grad_taps.permute(1, 2, 3, 4, 0).contiguous() if needs[0] else None
    return grad_attn, grad_value
