"""Real-data layouts on tiny files made here: ImageFolder, COCO json, ADE20K PNGs, and their errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visionzoo.data import InputError, build_datasets

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _img(path, size=(40, 32), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.full((size[1], size[0], channels), value, np.uint8).squeeze()
    Image.fromarray(arr, mode).save(path)


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, msg


def test_imagefolder(tmp_path):
    pytest.importorskip("timm")
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _img(tmp_path / split / c / "a.png")
    data = build_datasets("classification", dict(format="imagefolder", root=str(tmp_path), img_size=32), MEAN, STD)
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and data.num_classes == 2 and y in (0, 1)
    assert data.val[1][0].shape == (3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(InputError) as e:
        build_datasets("classification", dict(format="imagefolder", root=str(tmp_path / "nope")), MEAN, STD)
    _one_line(e, "data root not found", tmp_path / "nope")
    for split in ("train", "val"):
        _img(tmp_path / split / "cat" / "grey.png", mode="L")
    data = build_datasets("classification", dict(format="imagefolder", root=str(tmp_path), img_size=32), MEAN, STD)
    with pytest.raises(InputError) as e:
        data.val[0]
    _one_line(e, "grey.png", "1 channel", "expected 3")
    data = build_datasets("classification", dict(format="imagefolder", root=str(tmp_path), img_size=32,
                                                 convert_rgb=True), MEAN, STD)
    assert data.val[0][0].shape[0] == 3


def _coco(tmp_path, split="val", corrupt=None):
    img_dir = tmp_path / f"{split}2017"
    _img(img_dir / "1.png", size=(64, 48))
    _img(img_dir / "2.png", size=(64, 48), mode="RGBA")
    ann = {
        "images": [{"id": 1, "file_name": "1.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "2.png", "width": 64, "height": 48}],
        "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 9, "bbox": [4, 6, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[4, 6, 24, 6, 24, 16, 4, 16]]},
            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]},
        ],
    }
    path = tmp_path / "annotations" / f"instances_{split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(corrupt if corrupt is not None else json.dumps(ann))
    return path


COCO_CFG = dict(format="coco", train_images="train2017", val_images="val2017",
                train_ann="annotations/instances_train2017.json", val_ann="annotations/instances_val2017.json",
                img_size=48, min_sizes=[48], max_size=64)


def test_coco(tmp_path):
    pytest.importorskip("pycocotools")
    _coco(tmp_path, "train")
    _coco(tmp_path, "val")
    data = build_datasets("detection", dict(COCO_CFG, root=str(tmp_path), with_masks=True))
    assert data.num_classes == 2
    img, t = data.val[0]
    assert img.shape == (3, 48, 64) and img.dtype == torch.float32
    assert t["labels"].tolist() == [2] and t["boxes"].tolist() == [[4.0, 6.0, 24.0, 16.0]]
    assert t["masks"].shape == (1, 48, 64) and t["masks"].sum() > 100
    with pytest.raises(InputError) as e:  # the RGBA image
        data.val[1]
    _one_line(e, "2.png", "4 channel")


@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"), ('{"images": []}', "needs 'images'")])
def test_coco_corrupt_annotation(tmp_path, content, needle):
    pytest.importorskip("pycocotools")
    path = _coco(tmp_path, "val", corrupt=content)
    with pytest.raises(InputError) as e:
        build_datasets("detection", dict(COCO_CFG, root=str(tmp_path)), train=False)
    _one_line(e, "corrupt annotation file", path, needle)


def test_coco_missing_annotation(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(InputError) as e:
        build_datasets("detection", dict(COCO_CFG, root=str(tmp_path)), train=False)
    _one_line(e, "annotation file not found", "instances_val2017.json")


def _ade(tmp_path, split, label_mode="L"):
    _img(tmp_path / "images" / split / "x.jpg", size=(64, 64))
    lab = np.zeros((64, 64), np.uint8)
    lab[:32] = 1
    lab[32:, :32] = 3
    p = tmp_path / "annotations" / split / "x.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    if label_mode == "RGB":
        Image.fromarray(np.stack([lab] * 3, -1), "RGB").save(p)
    else:
        Image.fromarray(lab, "L").save(p)
    return p


ADE_CFG = dict(format="ade20k", num_classes=150, img_size=32, scale=32, ratio_range=[1.0, 1.0])


def test_ade20k_reduce_zero_label(tmp_path):
    for s in ("training", "validation"):
        _ade(tmp_path, s)
    data = build_datasets("segmentation", dict(ADE_CFG, root=str(tmp_path)), MEAN, STD)
    img, lab = data.val[0]
    assert img.shape == (3, 32, 32) and lab.shape == (32, 32) and lab.dtype == torch.int64
    assert set(lab.unique().tolist()) == {0, 2, 255}  # 1 -> 0, 3 -> 2, 0 -> ignore
    img, lab = data.train[0]
    assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
    data = build_datasets("segmentation", dict(ADE_CFG, root=str(tmp_path), reduce_zero_label=False), MEAN, STD)
    assert set(data.val[0][1].unique().tolist()) == {0, 1, 3}


def test_ade20k_errors(tmp_path):
    with pytest.raises(InputError) as e:
        build_datasets("segmentation", dict(ADE_CFG, root=str(tmp_path / "none")), MEAN, STD)
    _one_line(e, "data root not found")
    _ade(tmp_path, "training")
    p = _ade(tmp_path, "validation", label_mode="RGB")
    data = build_datasets("segmentation", dict(ADE_CFG, root=str(tmp_path)), MEAN, STD)
    with pytest.raises(InputError) as e:
        data.val[0]
    _one_line(e, p, "single-channel")
    p.unlink()
    with pytest.raises(InputError) as e:
        build_datasets("segmentation", dict(ADE_CFG, root=str(tmp_path)), MEAN, STD)
    _one_line(e, "label file not found", p)
