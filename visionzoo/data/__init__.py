"""Datasets and transforms for the three tasks.

* ``demo``: the built-in synthetic shapes set (:mod:`visionzoo.data.synthetic`), no download;
* ``imagefolder``: ImageNet-layout classification (``root/{train,val}/<class>/<image>``) through
  torchvision's ``ImageFolder`` with timm's ``create_transform``;
* ``coco``: COCO json + images (boxes, instance masks) through pycocotools (:mod:`visionzoo.data.coco`);
* ``ade20k``: images + label PNGs, ``ignore_index`` 255 and ``reduce_zero_label`` (:mod:`visionzoo.data.ade20k`).

Dense transforms are torchvision's ``transforms.v2``, which keep boxes and masks in step with the
image (flip, resize, crop); see :mod:`visionzoo.data.transforms`. Bad input raises
:class:`visionzoo.data.errors.InputError` with a one-line message naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch.utils.data import Dataset

from .errors import InputError
from .synthetic import SyntheticClassification, SyntheticDetection, SyntheticSegmentation, SyntheticShapes

__all__ = ["InputError", "SyntheticShapes", "SyntheticClassification", "SyntheticDetection",
           "SyntheticSegmentation", "DataBundle", "build_datasets", "detection_collate"]


def detection_collate(batch):
    """Detection batches stay lists: ``(tuple of images, tuple of target dicts)``."""
    return tuple(zip(*batch))


@dataclass
class DataBundle:
    train: Optional[Dataset]
    val: Dataset
    num_classes: int
    collate_fn: Optional[Callable] = None


def build_datasets(task: str, data: Dict[str, Any], mean: Tuple[float, ...] = (0.485, 0.456, 0.406),
                   std: Tuple[float, ...] = (0.229, 0.224, 0.225), train: bool = True) -> DataBundle:
    """Train and validation sets for ``task`` from a ``data`` config (see ``configs/data/*.yaml``).

    ``mean``/``std`` are the backbone's normalisation; detection images stay in [0, 1] because
    torchvision detectors normalise inside the model.
    """
    fmt = data["format"]
    collate = detection_collate if task == "detection" else None
    if fmt == "demo":
        from .transforms import normalize_pair, normalize_image

        common = dict(num_classes=data.get("num_classes", 3), img_size=data.get("img_size", 64))
        if data.get("num_objects") is not None:
            common["num_objects"] = tuple(data["num_objects"])
        cls = {"classification": SyntheticClassification, "detection": SyntheticDetection,
               "segmentation": SyntheticSegmentation}[task]
        tf = {"classification": normalize_image(mean, std), "detection": None,
              "segmentation": normalize_pair(mean, std)}[task]
        tr = cls(data.get("num_train", 1000), transform=tf, seed=data.get("seed", 0), **common) if train else None
        va = cls(data.get("num_val", 200), transform=tf, seed=data.get("seed", 0) + 1_000_000, **common)
        return DataBundle(tr, va, va.num_classes, collate)
    if data.get("root") in (None, "", "???"):  # "???": the config's mandatory value, never set
        raise InputError(f"data.root is not set: pass data.root=<folder> holding the {fmt} layout "
                         f"(see configs/data/*.yaml)")
    if fmt == "imagefolder":
        if task != "classification":
            raise InputError(f"data format 'imagefolder' is for classification, not {task}")
        from .classification import build_imagefolder
        return build_imagefolder(data, mean, std, train)
    if fmt == "coco":
        if task != "detection":
            raise InputError(f"data format 'coco' is for detection, not {task}")
        from .coco import build_coco
        return build_coco(data, train)
    if fmt == "ade20k":
        if task != "segmentation":
            raise InputError(f"data format 'ade20k' is for segmentation, not {task}")
        from .ade20k import build_ade20k
        return build_ade20k(data, mean, std, train)
    raise InputError(f"unknown data format {fmt!r}; use demo, imagefolder, coco or ade20k")
