"""Window indexing shared by every backend (NATTEN 0.17 ``na2d`` semantics, dilation 1).

Along an axis of length ``L >= K``, pixel ``i`` sees the ``K`` keys starting at
``s(i) = clamp(i - K // 2, 0, L - K)``: the window is centred where it fits and shifted inward at the
borders (never zero-padded), so every pixel sees exactly ``K`` real keys. A border pixel's window is
the window of the nearest pixel whose centred window fits.

Relative-position-bias indexing (NATTEN's ``na2d_qk(rpb=...)``): tap ``a`` of pixel ``i`` reads
``rpb[g, s(i) + a - i + K - 1, ...]``, i.e. the bias is indexed by the key-minus-query offset, shifted
into ``[0, 2K - 2]``; the table is ``(G, 2K - 1, 2K - 1)``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch
from torch import Tensor


def window_starts(length: int, kernel_size: int, device=None) -> Tensor:
    """``s(i)`` for ``i in range(length)`` (int64, ``(length,)``)."""
    i = torch.arange(length, device=device)
    return (i - kernel_size // 2).clamp(0, length - kernel_size)


def window_keys(length: int, kernel_size: int, device=None) -> Tensor:
    """Key position of tap ``a`` for pixel ``i``: ``s(i) + a`` (int64, ``(length, K)``)."""
    return window_starts(length, kernel_size, device)[:, None] + torch.arange(kernel_size, device=device)


def _cacheable() -> bool:
    """Index tensors are cached per (size, device) unless traced (dynamo / fake tensors)."""
    return not torch.compiler.is_compiling() and torch._guards.detect_fake_mode() is None


def flat_keys(height: int, width: int, kernel_size: int, device=None) -> Tensor:
    if _cacheable():
        with torch.inference_mode(False):  # a normal tensor even when first built under inference_mode
            return _flat_keys_cached(height, width, kernel_size, device)
    return _flat_keys(height, width, kernel_size, device)


def rpb_index(height: int, width: int, kernel_size: int, device=None) -> Tensor:
    """Index into a flattened ``(2K-1) * (2K-1)`` bias table for every (pixel, tap): ``(H*W*K*K,)``."""
    if _cacheable():
        with torch.inference_mode(False):
            return _rpb_index_cached(height, width, kernel_size, device)
    return _rpb_index(height, width, kernel_size, device)


def _flat_keys(height: int, width: int, kernel_size: int, device=None) -> Tensor:
    """Flat key index ``(s(i) + a) * W + s(j) + b`` of tap ``a * K + b`` of pixel ``(i, j)``: ``(H*W, K*K)``."""
    rows = window_keys(height, kernel_size, device)  # (H, K)
    cols = window_keys(width, kernel_size, device)  # (W, K)
    idx = rows[:, None, :, None] * width + cols[None, :, None, :]  # (H, W, K, K)
    return idx.reshape(height * width, kernel_size * kernel_size)


def _rpb_index(height: int, width: int, kernel_size: int, device=None) -> Tensor:
    K = kernel_size
    r = window_keys(height, K, device) - torch.arange(height, device=device)[:, None] + K - 1  # (H, K)
    c = window_keys(width, K, device) - torch.arange(width, device=device)[:, None] + K - 1  # (W, K)
    idx = r[:, None, :, None] * (2 * K - 1) + c[None, :, None, :]  # (H, W, K, K)
    return idx.reshape(-1)


_flat_keys_cached = lru_cache(maxsize=128)(_flat_keys)  # callers never modify the returned tensors
_rpb_index_cached = lru_cache(maxsize=128)(_rpb_index)


def check_inputs(name: str, attn: Tensor, value: Tensor, kernel_size: int) -> Tuple[int, int, int, int, int]:
    """Validate NATTEN-layout inputs; returns ``(B, G, H, W, c)``."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be a positive odd int, got {kernel_size!r}")
    for arg, x in (("attn", attn), ("value", value)):
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError(f"{name}: {arg} must be a 5-d tensor ({'(B, G, H, W, K*K)' if arg == 'attn' else '(B, G, H, W, c)'}),"
                             f" got {getattr(x, 'shape', type(x).__name__)}")
    B, G, H, W, c = value.shape
    if tuple(attn.shape) != (B, G, H, W, kernel_size * kernel_size):
        raise ValueError(f"{name}: attn must be (B, G, H, W, K*K) = {(B, G, H, W, kernel_size * kernel_size)} "
                         f"for value {tuple(value.shape)} and kernel_size={kernel_size}, got {tuple(attn.shape)}")
    if H < kernel_size or W < kernel_size:
        raise ValueError(f"{name}: the {H}x{W} map is smaller than the {kernel_size}x{kernel_size} window "
                         f"(NATTEN needs H, W >= kernel_size; resize or pad first)")
    if attn.dtype != value.dtype or attn.device != value.device:
        raise ValueError(f"{name}: attn ({attn.dtype}, {attn.device}) and value ({value.dtype}, {value.device}) "
                         f"must share dtype and device")
    return B, G, H, W, c
