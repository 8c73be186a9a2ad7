"""Paired transforms for dense tasks, on torchvision's ``transforms.v2``.

``transforms.v2`` transforms an image together with its ``tv_tensors.BoundingBoxes`` and
``tv_tensors.Mask`` targets, so flips, resizes and crops keep boxes, instance masks and label maps
in step with the pixels; nothing geometric is re-implemented here. This module only assembles the
usual recipes:

* detection (torchvision / mmdet style): horizontal flip, random short-side resize, then
  ``SanitizeBoundingBoxes`` to drop boxes a crop or resize made degenerate. Images stay in [0, 1];
  the detector normalises and batches them;
* segmentation (mmseg style): random rescale (ratio range), random crop padded with ``ignore_index``,
  horizontal flip, normalisation; evaluation resizes the short side only.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .errors import InputError

__all__ = ["normalize_image", "normalize_pair", "check_max_size", "detection_transform", "segmentation_transform"]


def normalize_image(mean: Sequence[float], std: Sequence[float]) -> Callable:
    """(3, H, W) float in [0, 1] -> normalised."""
    return v2.Normalize(list(mean), list(std))


def normalize_pair(mean: Sequence[float], std: Sequence[float]) -> Callable:
    """``(image, target)`` -> ``(normalised image, target)``."""
    norm = v2.Normalize(list(mean), list(std))

    def f(image: torch.Tensor, target):
        return norm(image), target
    return f


def check_max_size(max_size: Optional[int], sizes: Dict[str, Any]) -> None:
    """torchvision's ``Resize(size, max_size=...)`` needs ``max_size > size``: one line naming the settings
    (``sizes``: data-config name -> the short-side size it sets)."""
    if max_size is None:
        return
    for name, size in sizes.items():
        if int(max_size) <= int(size):
            raise InputError(f"data.max_size={max_size} must be greater than data.{name}={size} (images are resized "
                             f"to that short side, then capped at max_size on the long side)")


def detection_transform(train: bool, min_sizes: Sequence[int] = (800,), max_size: int = 1333) -> Callable:
    """Paired transform for ``(PIL image, {"boxes": BoundingBoxes, "masks": Mask, "labels"})``."""
    ops = [v2.ToImage()]
    if train:
        ops += [v2.RandomHorizontalFlip(), v2.RandomChoice([v2.Resize(int(s), max_size=max_size) for s in min_sizes])]
    else:
        ops += [v2.Resize(int(max(min_sizes)), max_size=max_size)]
    ops += [v2.ToDtype(torch.float32, scale=True)]
    if train:
        ops += [v2.SanitizeBoundingBoxes()]
    return v2.Compose(ops)


class _SegPair:
    """Apply a v2 pipeline to ``(image, label)`` with the label as a ``Mask`` and return a long map."""

    def __init__(self, pipeline: Callable):
        self.pipeline = pipeline

    def __call__(self, image, label):
        image, label = self.pipeline(tv_tensors.Image(image) if torch.is_tensor(image) else image,
                                     tv_tensors.Mask(label))
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long().squeeze(0)


def segmentation_transform(train: bool, mean: Sequence[float], std: Sequence[float], crop_size: int = 512,
                           scale: int = 512, ratio_range: Tuple[float, float] = (0.5, 2.0),
                           ignore_index: int = 255, max_size: Optional[int] = None) -> Callable:
    """The mmseg ADE20K recipe: ``RandomResize(ratio 0.5-2) -> RandomCrop -> Flip -> Normalize``."""
    ops = [v2.ToImage()]
    if train:
        lo, hi = int(scale * ratio_range[0]), int(scale * ratio_range[1])
        ops += [
            v2.RandomShortestSize(list(range(lo, hi + 1, 32)), max_size=max_size),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(),
        ]
    else:
        ops += [v2.Resize(scale, max_size=max_size)]
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(list(mean), list(std))]
    return _SegPair(v2.Compose(ops))
