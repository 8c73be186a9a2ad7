"""COCO detection / instance segmentation: the json annotation file + an image folder (pycocotools).

Layout (``configs/data/coco.yaml``): ``root/annotations/instances_{train,val}2017.json`` and
``root/{train,val}2017/*.jpg``; any file names work through the config. Category ids are mapped to
contiguous labels ``1..C`` in sorted id order (0 is the detector's background); ``iscrowd``
annotations are left out (as torchvision's reference scripts do for training). Instance masks
(polygons or RLE) are decoded by pycocotools' ``annToMask`` when the model predicts masks.

A missing file, a file that is not JSON, a JSON without the COCO keys, or an annotation whose ``bbox``
is not four numbers stops with one line that names the file (and the annotation).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .classification import open_rgb
from .errors import InputError

__all__ = ["CocoDetection", "load_coco", "build_coco"]


def load_coco(ann_file: str | Path):
    """A ``pycocotools.coco.COCO`` index of ``ann_file``, with one-line errors for bad files."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise InputError(f"annotation file not found: {ann_file}")
    try:
        dataset = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt annotation file {ann_file}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(dataset, dict) or not all(k in dataset for k in ("images", "annotations", "categories")):
        raise InputError(f"corrupt annotation file {ann_file}: a COCO json needs 'images', 'annotations' and 'categories'")
    _check_boxes(dataset["annotations"], ann_file)
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise InputError(f"corrupt annotation file {ann_file}: bad entry ({type(e).__name__}: {e})") from None
    return coco


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _check_boxes(annotations: Any, ann_file: Path) -> None:
    """Every annotation is an object with ``category_id`` and a ``bbox`` of four finite numbers (checked
    once here, in the main process, instead of failing in a loader worker mid-epoch)."""
    if not isinstance(annotations, list):
        raise InputError(f"corrupt annotation file {ann_file}: 'annotations' is a {type(annotations).__name__}, not a list")
    for i, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise InputError(f"corrupt annotation file {ann_file}: annotations[{i}] is a {type(a).__name__}, not an object")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise InputError(f"corrupt annotation file {ann_file}: annotation {a.get('id', f'#{i}')} has bbox "
                             f"{str(box)[:60]}, expected [x, y, width, height] numbers")
        if "category_id" not in a:
            raise InputError(f"corrupt annotation file {ann_file}: annotation {a.get('id', f'#{i}')} has no category_id")


class CocoDetection(Dataset):
    """``(image (3, H, W) float in [0, 1], {"boxes" (N, 4) xyxy, "labels" (N,), "masks" (N, H, W)?, "image_id"})``."""

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transform=None, with_masks: bool = False,
                 skip_empty: bool = True, convert_rgb: bool = False):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise InputError(f"image directory not found: {self.image_dir}")
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids
        self.transform = transform
        self.with_masks = with_masks
        self.convert_rgb = convert_rgb

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        image = open_rgb(self.image_dir / info["file_name"], self.convert_rgb)
        w, h = image.size
        boxes, labels, masks = [], [], []
        for a in self.coco.imgToAnns.get(img_id, []):
            if a.get("iscrowd", 0):
                continue
            try:
                x, y, bw, bh = a["bbox"]
                label = self.label_of[a["category_id"]]
            except (KeyError, ValueError, TypeError):
                raise InputError(f"corrupt annotation file {self.ann_file}: annotation {a.get('id')} "
                                 f"has no valid bbox/category_id") from None
            if bw <= 1 or bh <= 1:
                continue
            boxes.append([x, y, min(x + bw, w), min(y + bh, h)])
            labels.append(label)
            if self.with_masks:
                masks.append(self.coco.annToMask(a))
        target: Dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(np.stack(masks)) if masks
                                              else torch.zeros((0, h, w), dtype=torch.uint8))
        if self.transform is not None:
            image, target = self.transform(image, target)
        out = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
        out["image_id"] = img_id
        return image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else image, out


def build_coco(data: Dict[str, Any], train: bool = True):
    from . import DataBundle, detection_collate
    from .transforms import check_max_size, detection_transform

    root = Path(str(data["root"])).expanduser()
    if not root.is_dir():
        raise InputError(f"data root not found: {root}")
    masks = bool(data.get("with_masks", False))
    min_sizes = data.get("min_sizes") or [data.get("img_size", 800)]
    max_size = int(data.get("max_size", 1333))
    check_max_size(max_size, {"img_size": data.get("img_size", 800), "min_sizes": max(int(s) for s in min_sizes)})

    def make(split: str, is_train: bool):
        return CocoDetection(root / data[f"{split}_images"], root / data[f"{split}_ann"],
                             transform=detection_transform(is_train, min_sizes if is_train else [data.get("img_size", 800)],
                                                           max_size),
                             with_masks=masks, skip_empty=is_train, convert_rgb=bool(data.get("convert_rgb", False)))

    val = make("val", False)
    tr = make("train", True) if train else None
    return DataBundle(tr, val, val.num_classes, detection_collate)
