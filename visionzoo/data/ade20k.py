"""ADE20K-style semantic segmentation: images + single-channel label PNGs with the same file stem.

Layout (ADEChallengeData2016, ``configs/data/ade20k.yaml``): ``root/images/<split>/*.jpg`` and
``root/annotations/<split>/*.png``. ``reduce_zero_label`` (ADE20K: label 0 is "other") maps 0 to
``ignore_index`` and shifts every other label down by one, as mmseg's ``LoadAnnotations`` does.
Transforms: :func:`visionzoo.data.transforms.segmentation_transform` (mmseg's recipe).

A missing folder, an image without its label PNG, a label PNG with more than one channel or an
unreadable file stops with one line naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .classification import open_rgb
from .errors import InputError

__all__ = ["ADE20KSegmentation", "build_ade20k"]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ADE20KSegmentation(Dataset):
    """``(image (3, H, W) normalised float, label (H, W) int64)``; ``ignore_index`` marks unlabeled pixels."""

    def __init__(self, root: str | Path, split: str = "training", transform=None, reduce_zero_label: bool = True,
                 ignore_index: int = 255, num_classes: int = 150, convert_rgb: bool = False):
        root = Path(root)
        self.image_dir, self.label_dir = root / "images" / split, root / "annotations" / split
        for d in (self.image_dir, self.label_dir):
            if not d.is_dir():
                raise InputError(f"directory not found: {d} (expected root/images/{split} and root/annotations/{split})")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTS)
        if not self.images:
            raise InputError(f"no images in {self.image_dir}")
        self.labels = []
        for p in self.images:
            lab = self.label_dir / (p.stem + ".png")
            if not lab.is_file():
                raise InputError(f"label file not found: {lab} (for image {p})")
            self.labels.append(lab)
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.num_classes = num_classes
        self.convert_rgb = convert_rgb

    def __len__(self) -> int:
        return len(self.images)

    def _label(self, path: Path) -> torch.Tensor:
        try:
            lab = Image.open(path)
            lab.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read label file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if lab.mode not in ("L", "P", "I", "I;16"):
            raise InputError(f"label file {path} has PIL mode {lab.mode} ({len(lab.getbands())} channels); "
                             f"expected a single-channel PNG of class indices")
        arr = np.asarray(lab, dtype=np.int64)
        if self.reduce_zero_label:
            arr = np.where(arr == 0, self.ignore_index, arr - 1)
            arr[arr == self.ignore_index - 1] = self.ignore_index  # 255 stays ignored after the shift
        return torch.from_numpy(arr)

    def __getitem__(self, index: int):
        image = open_rgb(self.images[index], self.convert_rgb)
        label = self._label(self.labels[index])
        if label.shape != (image.size[1], image.size[0]):
            raise InputError(f"label file {self.labels[index]} is {tuple(label.shape)} but image "
                             f"{self.images[index]} is {(image.size[1], image.size[0])}")
        if self.transform is not None:
            return self.transform(image, label)
        return image, label


def build_ade20k(data: Dict[str, Any], mean, std, train: bool = True):
    from . import DataBundle
    from .transforms import check_max_size, segmentation_transform

    root = Path(str(data["root"])).expanduser()
    if not root.is_dir():
        raise InputError(f"data root not found: {root}")
    kw = dict(reduce_zero_label=bool(data.get("reduce_zero_label", True)), ignore_index=int(data.get("ignore_index", 255)),
              num_classes=int(data.get("num_classes", 150)), convert_rgb=bool(data.get("convert_rgb", False)))
    tf = dict(mean=mean, std=std, crop_size=int(data.get("img_size", 512)), scale=int(data.get("scale", 512)),
              ratio_range=tuple(data.get("ratio_range", (0.5, 2.0))), ignore_index=kw["ignore_index"],
              max_size=data.get("max_size"))
    check_max_size(tf["max_size"], {"scale": tf["scale"]})
    val = ADE20KSegmentation(root, data.get("val_split", "validation"), segmentation_transform(False, **tf), **kw)
    tr = ADE20KSegmentation(root, data.get("train_split", "training"), segmentation_transform(True, **tf), **kw) if train else None
    return DataBundle(tr, val, kw["num_classes"])
