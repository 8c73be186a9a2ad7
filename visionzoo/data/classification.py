"""ImageNet-layout classification: ``root/<split>/<class>/<image>`` via torchvision's ``ImageFolder``.

Transforms are timm's ``create_transform`` (train: random-resized crop, flip, RandAugment, random
erasing; eval: resize + centre crop at the backbone's ``crop_pct``). Images are opened with PIL and
checked for their channel count: RGB files load as they are, greyscale / palette / RGBA files are
rejected with the file named (set ``data.convert_rgb=true`` to convert them instead, as ImageNet's
handful of CMYK/greyscale JPEGs need).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import InputError

__all__ = ["build_imagefolder", "open_rgb"]

_CHANNELS = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "I": 1, "I;16": 1, "F": 1, "YCbCr": 3}


def open_rgb(path: str | Path, convert: bool = False) -> Image.Image:
    """Open an image as RGB; a file of another channel count is an :class:`InputError` unless ``convert``."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if img.mode != "RGB":
        if not convert:
            raise InputError(f"image {path} has {_CHANNELS.get(img.mode, '?')} channel(s) (PIL mode {img.mode}), "
                             f"expected 3 (RGB); set data.convert_rgb=true to convert")
        img = img.convert("RGB")
    return img


def _split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise InputError(f"data root not found: {root}")
    d = root / split
    if not d.is_dir():
        raise InputError(f"split directory not found: {d} (expected ImageNet layout root/{split}/<class>/<image>)")
    return d


def build_imagefolder(data: Dict[str, Any], mean: Sequence[float], std: Sequence[float], train: bool = True):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from . import DataBundle

    root = Path(str(data["root"])).expanduser()
    convert = bool(data.get("convert_rgb", False))
    size = int(data.get("img_size", 224))
    loader = lambda p: open_rgb(p, convert)  # noqa: E731

    def make(split: str, is_train: bool):
        d = _split_dir(root, split)
        tf = create_transform(
            size, is_training=is_train, mean=tuple(mean), std=tuple(std),
            interpolation=data.get("interpolation", "bicubic"), crop_pct=data.get("crop_pct"),
            **(dict(auto_augment=data.get("auto_augment"), re_prob=data.get("re_prob", 0.0)) if is_train else {}),
        )
        try:
            return ImageFolder(str(d), transform=tf, loader=loader)
        except FileNotFoundError as e:
            raise InputError(f"no class folders with images in {d}: {str(e).splitlines()[0]}") from None

    val = make(data.get("val_split", "val"), False)
    tr = make(data.get("train_split", "train"), True) if train else None
    if tr is not None and tr.classes != val.classes:
        raise InputError(f"class folders differ between {root / data.get('train_split', 'train')} and "
                         f"{root / data.get('val_split', 'val')}")
    return DataBundle(tr, val, len(val.classes))
