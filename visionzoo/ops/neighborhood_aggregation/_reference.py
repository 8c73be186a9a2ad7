"""The ``reference`` backend: gather every pixel's window, then a weighted sum (plain autograd).

It materialises the ``(B, G, H, W, K*K, c)`` window tensor, which is what NATTEN's and the official
``contmix.py`` fallbacks compute and what the other backends avoid. It defines the semantics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import flat_keys


def na2d_av_reference(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    """``attn`` ``(B, G, H, W, K*K)``, ``value`` ``(B, G, H, W, c)`` -> ``(B, G, H, W, c)``:
    ``out[i, j] = sum_{a,b} attn[i, j, a*K+b] * value[s(i)+a, s(j)+b]``."""
    B, G, H, W, c = value.shape
    keys = flat_keys(H, W, kernel_size, value.device).reshape(-1)  # (H*W*K*K,)
    windows = value.reshape(B, G, H * W, c).index_select(2, keys)  # (B, G, H*W*K*K, c)
    windows = windows.reshape(B, G, H, W, kernel_size * kernel_size, c)
    return torch.einsum("bghwk,bghwkc->bghwc", attn, windows)
