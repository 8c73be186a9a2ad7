"""The built-in synthetic demo set: coloured shapes on textured backgrounds, made on the fly.

Every sample is a pure function of ``(seed, index)``: the same index gives the same image and targets
in every process, worker and run, so the demo and the tests need no download, distributed runs see
the same data, and an interrupted run resumes on identical batches.

Each image holds ``num_objects`` shapes (circle, square, triangle, cross, ring, ...; one class per
shape kind) in saturated colours over a muted texture (a few sinusoidal stripes plus pixel noise).
Later shapes occlude earlier ones; instance masks and boxes describe the *visible* part, and an
instance whose visible area falls below ``min_visible`` of its full area is dropped from the targets
(it stays in the image and in the semantic mask, whose pixels it still is).

Targets (``SyntheticShapes.sample``):

* ``image``: float32 (3, H, W) in [0, 1];
* ``labels``: int64 (N,) shape classes in ``[0, num_shape_classes)``;
* ``boxes``: float32 (N, 4) ``x1, y1, x2, y2`` in pixels (exclusive right/bottom edge);
* ``masks``: uint8 (N, H, W) visible instance masks;
* ``semantic``: int64 (H, W), 0 = background, ``1 + class`` for shape pixels.

The task views (``SyntheticClassification``, ``SyntheticDetection``, ``SyntheticSegmentation``) turn
a sample into what each task trains on.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if kind == "triangle":  # apex up, base at cy + r
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if kind == "cross":
        w = r * 0.35
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(f"unknown shape {kind!r}")


class SyntheticShapes:
    """Deterministic generator of shape scenes (see the module docstring).

    Args:
        num_classes: number of shape kinds used (<= 6), i.e. foreground classes.
        img_size: square image side in pixels.
        num_objects: (min, max) shapes per image.
        radius: (min, max) shape radius as a fraction of ``img_size``.
        seed: offsets every index; train and validation sets use different seeds.
        min_visible: instances with less visible area than this fraction are dropped from the targets.
    """

    def __init__(self, num_classes: int = 3, img_size: int = 64, num_objects: tuple[int, int] = (1, 3),
                 radius: tuple[float, float] = (0.1, 0.25), seed: int = 0, min_visible: float = 0.3):
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"SyntheticShapes: num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
        self.num_classes = num_classes
        self.img_size = int(img_size)
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))
        self.radius = (float(radius[0]), float(radius[1]))
        self.seed = int(seed)
        self.min_visible = min_visible
        s = self.img_size
        self._yy, self._xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.img_size
        base = rng.uniform(0.25, 0.6, size=3).astype(np.float32)  # muted base colour
        img = np.broadcast_to(base[:, None, None], (3, s, s)).copy()
        for _ in range(rng.integers(1, 4)):  # stripes of random direction and frequency
            theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.5, 6.0) / s, rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * freq * (self._xx * np.cos(theta) + self._yy * np.sin(theta)) + phase)
            img += rng.uniform(0.03, 0.1, size=3).astype(np.float32)[:, None, None] * wave[None]
        img += rng.normal(0, 0.04, size=img.shape).astype(np.float32)
        return img

    def sample(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng([self.seed, int(index)])
        s = self.img_size
        img = self._background(rng)
        n = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        full, labels = [], []
        owner = np.full((s, s), -1, dtype=np.int64)  # index of the topmost shape per pixel
        for i in range(n):
            cls = int(rng.integers(self.num_classes))
            r = rng.uniform(*self.radius) * s
            cy, cx = rng.uniform(r, s - r), rng.uniform(r, s - r)
            m = _shape_mask(SHAPES[cls], self._yy, self._xx, cy, cx, r)
            hue = rng.uniform(0, 1)
            colour = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # saturated hue
            colour = (0.15 + 0.85 * colour).astype(np.float32) * rng.uniform(0.75, 1.0)
            img[:, m] = colour[:, None] + rng.normal(0, 0.02, size=(3, int(m.sum()))).astype(np.float32)
            owner[m] = i
            full.append(m)
            labels.append(cls)
        keep_labels, boxes, masks = [], [], []
        semantic = np.zeros((s, s), dtype=np.int64)
        for i, (m, cls) in enumerate(zip(full, labels)):
            vis = owner == i
            semantic[vis] = cls + 1
            area = int(vis.sum())
            if area == 0 or area < self.min_visible * max(int(m.sum()), 1):
                continue
            ys, xs = np.nonzero(vis)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            masks.append(vis)
            keep_labels.append(cls)
        return {
            "image": torch.from_numpy(np.clip(img, 0, 1)),
            "labels": torch.tensor(keep_labels, dtype=torch.int64),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, s, s), bool)).to(torch.uint8),
            "semantic": torch.from_numpy(semantic),
        }


class _SyntheticView(Dataset):
    def __init__(self, length: int = 1000, transform: Optional[Callable] = None, **kwargs):
        self.length = int(length)
        self.shapes = SyntheticShapes(**kwargs)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return self.shapes.num_classes

    def __len__(self) -> int:
        return self.length

    def _sample(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.shapes.sample(index)


class SyntheticClassification(_SyntheticView):
    """One shape per image; the target is its class. Returns ``(image (3, H, W), label)``."""

    def __init__(self, length: int = 1000, transform: Optional[Callable] = None, **kwargs):
        kwargs.setdefault("num_objects", (1, 1))
        kwargs.setdefault("radius", (0.2, 0.4))
        kwargs["min_visible"] = 0.0
        super().__init__(length, transform, **kwargs)

    def __getitem__(self, index: int):
        s = self._sample(index)
        image = s["image"] if self.transform is None else self.transform(s["image"])
        return image, int(s["labels"][0])


class SyntheticDetection(_SyntheticView):
    """Returns ``(image, {"boxes", "labels", "masks"})`` in torchvision detection format.

    Labels are shifted by one (``0`` is torchvision's background), so ``num_classes`` of a detector
    trained on this set is ``shapes + 1`` for the R-CNNs; see :mod:`visionzoo.tasks.detection`.
    """

    def __getitem__(self, index: int):
        s = self._sample(index)
        target = {"boxes": s["boxes"], "labels": s["labels"] + 1, "masks": s["masks"]}
        image = s["image"]
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class SyntheticSegmentation(_SyntheticView):
    """Returns ``(image, semantic (H, W) int64)``: 0 background, ``1 + shape class`` foreground."""

    @property
    def num_classes(self) -> int:
        return self.shapes.num_classes + 1

    def __getitem__(self, index: int):
        s = self._sample(index)
        image, target = s["image"], s["semantic"]
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target
