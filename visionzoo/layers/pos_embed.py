"""Absolute position-embedding resampling for sequences whose extra token sits inside the grid.

Vim (and other "middle class token" models) insert the class token at index ``M // 2`` of the
``M`` patch tokens and add a position embedding of ``M + 1`` rows *after* the insertion, so row
``M // 2`` belongs to the class token and every other row to a grid cell. The official Vim
fine-tuning code (``vim/utils.py: interpolate_pos_embed``) treats row 0 as the extra token, which
interpolates the class row into the grid and a grid row into the class slot (hustvl/Vim#108).
Here the class row is taken out, the grid is resampled, and the class row goes back in at the
middle of the *new* grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import resample_abs_pos_embed


def resample_pos_embed_with_inner_token(
    pos_embed: torch.Tensor,
    new_size: Sequence[int],
    old_size: Sequence[int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a ``(1, H*W + 1, C)`` position embedding whose extra row is at index ``H*W // 2``.

    Args:
        pos_embed: (1, old_h * old_w + 1, C), the extra (class) row at ``old_h * old_w // 2``.
        new_size: (new_h, new_w) grid.
        old_size: (old_h, old_w) grid.
    Returns:
        (1, new_h * new_w + 1, C) with the class row at ``new_h * new_w // 2``.
    """
    old_h, old_w = old_size
    new_h, new_w = new_size
    num_old = old_h * old_w
    if pos_embed.ndim != 3 or pos_embed.shape[1] != num_old + 1:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not match a {old_h}x{old_w} grid "
            f"plus one inner class token ({num_old + 1} rows expected)"
        )
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed
    mid_old = num_old // 2
    cls_row = pos_embed[:, mid_old:mid_old + 1]
    grid = torch.cat([pos_embed[:, :mid_old], pos_embed[:, mid_old + 1:]], dim=1)
    grid = resample_abs_pos_embed(
        grid, new_size=(new_h, new_w), old_size=(old_h, old_w), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias, verbose=False,
    )
    mid_new = (new_h * new_w) // 2
    return torch.cat([grid[:, :mid_new], cls_row, grid[:, mid_new:]], dim=1)
