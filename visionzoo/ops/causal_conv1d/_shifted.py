"""``shifted`` backend: ``K`` fused multiply-adds on time-shifted slices in a time-major ``(batch, L, dim)``
layout.

It reads a time-major ``x`` (a ``(batch, dim, L)`` view of ``(batch, L, dim)`` memory, as a ``Linear``
produces) without a transposing copy and keeps ``x``'s memory layout; on CPU it is about as fast as
oneDNN's depthwise conv1d (benchmarks/causal_conv1d_cpu.md). Plain torch ops, so every backend's
backward differentiates it (the forward is cheap to recompute).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._reference import activate


def causal_conv1d_shifted(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    K = weight.shape[1]
    L = x.shape[-1]
    xt = x.transpose(1, 2)  # (batch, L, dim); a view when x is time-major
    w = weight.to(x.dtype).t()  # (K, dim)
    # out[t] = bias + sum_s w[K-1-s] * x[t-s]
    if bias is None:
        y = xt * w[K - 1]
    else:
        y = torch.addcmul(bias.to(x.dtype), xt, w[K - 1])
    for s in range(1, min(K, L + 1)):
        y[:, s:].addcmul_(xt[:, : L - s], w[K - 1 - s])
    return activate(y, activation).transpose(1, 2)
