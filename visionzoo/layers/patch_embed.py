"""Patch embedding with input-size checks that name the problem.

A convolution of kernel ``patch_size`` and step ``stride`` (``stride == patch_size``: the usual
non-overlapping patches; ``stride < patch_size``: Vim's overlapping "†" models). Output is
channels-last ``(B, H', W', D)`` with ``H' = (H - patch) // stride + 1``.

A fixed-size model raises a ``ValueError`` for any other image size (timm's ``strict_img_size``,
with a message saying how to get a flexible model); a ``dynamic_img_size`` model takes any size the
patches tile exactly, and raises a ``ValueError`` naming the constraint otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import to_2tuple
from timm.models._features_fx import register_notrace_module


@register_notrace_module  # Python control flow on the input size
class PatchEmbed(nn.Module):
    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        stride: Optional[int] = None,
        in_chans: int = 3,
        embed_dim: int = 768,
        dynamic_img_size: bool = False,
        model_name: str = "model",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(patch_size if stride is None else stride)
        self.dynamic_img_size = dynamic_img_size
        self.model_name = model_name
        self.set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride,
                              device=device, dtype=dtype)

    def set_img_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid for an (H, W) image; ``ValueError`` if the patches do not tile it exactly."""
        grid = []
        for side, size, patch, stride in zip(("height", "width"), img_size, self.patch_size, self.stride):
            if size < patch or (size - patch) % stride != 0:
                example = patch + max(0, round((size - patch) / stride)) * stride
                raise ValueError(
                    f"{self.model_name}: image {side} {size} does not fit patch {patch} with stride {stride}; "
                    f"need {side} = {patch} + k * {stride} (e.g. {example})"
                )
            grid.append((size - patch) // stride + 1)
        return grid[0], grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{self.model_name} expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        size = (x.shape[-2], x.shape[-1])
        if self.dynamic_img_size:
            self.feat_size(size)
        elif size != self.img_size:
            raise ValueError(
                f"{self.model_name}: this model was built for {self.img_size[0]}x{self.img_size[1]} inputs, got "
                f"{size[0]}x{size[1]}; create it with dynamic_img_size=True or img_size={size}, "
                f"or call set_input_size()"
            )
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', D)
