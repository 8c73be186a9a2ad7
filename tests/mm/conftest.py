"""Fixtures of the OpenMMLab plugin tests (marker ``mm``; CI runs them in their own virtual environment).

TEST-ONLY stand-in for mmcv's compiled ops. CI installs ``mmcv-lite`` (no compiled ``mmcv._ext``), with
which ``import mmdet.models`` / ``mmseg.models`` fail. Here, and only here (never in the visionzoo
package), a module ``mmcv._ext`` is put in ``sys.modules`` whose ``nms``, ``roi_align_forward`` and
``roi_align_backward`` run torchvision's CPU kernels (the same algorithms mmcv compiles); every other
op raises ``NotImplementedError`` when called. With a full mmcv build installed the real module is used.

When mmengine / mmdet / mmseg are not installed (the main test environment), the ``mm`` tests are not
collected unless ``-m`` asks for them, so the default run neither fails nor skips them.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import pytest
import torch

_MM_PACKAGES = ("mmengine", "mmcv", "mmdet", "mmseg")
HAVE_MM = all(importlib.util.find_spec(p) is not None for p in _MM_PACKAGES)


def pytest_ignore_collect(collection_path, config):
    """Without the mm packages, collect tests/mm only when ``-m`` selects the mm tests (then the
    import error is the message)."""
    if HAVE_MM or collection_path.name == "conftest.py":
        return None
    markexpr = config.getoption("markexpr") or ""
    wants_mm = "mm" in markexpr and "not mm" not in markexpr
    return None if wants_mm else True


def _install_torchvision_ext() -> None:
    try:
        importlib.import_module("mmcv._ext")
        return  # a full mmcv build: use its compiled ops
    except ImportError:
        pass
    import torchvision

    ext = types.ModuleType("mmcv._ext")
    # no loader: pkgutil / mmengine see "no compiled mmcv" (mmcv_full_available() is False), as is true
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    ext.__doc__ = "visionzoo TEST FIXTURE: mmcv._ext ops backed by torchvision (tests/mm/conftest.py)"

    def nms(bboxes, scores, iou_threshold: float, offset: int = 0):
        if offset != 0:
            raise NotImplementedError("test fixture nms: only offset=0 (torchvision's box convention)")
        return torchvision.ops.nms(bboxes.float(), scores.float(), float(iou_threshold))

    def roi_align_forward(input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
                          spatial_scale, sampling_ratio, pool_mode, aligned):
        if pool_mode != 1:
            raise NotImplementedError("test fixture roi_align: only pool_mode='avg'")
        output.copy_(torchvision.ops.roi_align(input, rois, (aligned_height, aligned_width), spatial_scale,
                                               sampling_ratio, aligned))

    def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *, aligned_height, aligned_width,
                           spatial_scale, sampling_ratio, pool_mode, aligned):
        if pool_mode != 1:
            raise NotImplementedError("test fixture roi_align: only pool_mode='avg'")
        n, c, h, w = grad_input.shape
        grad_input.copy_(torch.ops.torchvision._roi_align_backward(
            grad_output, rois, spatial_scale, aligned_height, aligned_width, n, c, h, w, sampling_ratio, aligned))

    ext.nms = nms
    ext.roi_align_forward = roi_align_forward
    ext.roi_align_backward = roi_align_backward

    def __getattr__(name):  # every other compiled op: present for mmcv's import-time checks, fails when run
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not backed by the visionzoo test fixture "
                                      f"(mmcv-lite has no compiled ops)")
        return missing

    ext.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = ext
    import mmcv

    mmcv._ext = ext


if HAVE_MM:
    _install_torchvision_ext()


# --- tiny datasets ---------------------------------------------------------------------------
def _write_image(path: str, array) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


@pytest.fixture(scope="session")
def coco_dir(tmp_path_factory):
    """A COCO-format instance set: 4 images of 96x128 with 1-2 rectangles each (2 classes), as
    train and val (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``)."""
    import numpy as np

    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    from mmdet.datasets import CocoDataset

    # all 80 COCO categories (CocoDataset matches names, CocoMetric maps the 80 labels to ids); boxes use 1 and 2
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CocoDataset.METAINFO["classes"])]
    for split in ("train2017", "val2017"):
        os.makedirs(root / split)
        images, annotations = [], []
        for i in range(4):
            h, w = 96, 128
            img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            for j in range(1 + i % 2):
                x0, y0 = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
                bw, bh = int(rng.integers(16, w // 2 - 4)), int(rng.integers(16, h // 2 - 4))
                img[y0:y0 + bh, x0:x0 + bw] = 200 if j == 0 else 120
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i + 1, category_id=1 + j, iscrowd=0, area=float(bw * bh),
                    bbox=[x0, y0, bw, bh],
                    segmentation=[[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]],
                ))
            name = f"{i:012d}.jpg"
            _write_image(str(root / split / name), img)
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        os.makedirs(root / "annotations", exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


@pytest.fixture(scope="session")
def ade_dir(tmp_path_factory):
    """An ADE20K-format set: ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png`` (0 = ignore, 1..150 = classes, reduce_zero_label)."""
    import numpy as np

    root = tmp_path_factory.mktemp("ade")
    rng = np.random.default_rng(1)
    for split in ("training", "validation"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for i in range(4):
            h, w = 96, 128
            label = np.ones((h, w), dtype=np.uint8)  # class 0 after reduce_zero_label
            label[h // 3:, : w // 2] = 5
            label[: h // 4, w // 2:] = 13
            label[0:4] = 0  # an ignored strip
            img = (label[..., None] * 15 + rng.integers(0, 20, size=(h, w, 3))).astype(np.uint8)
            _write_image(str(root / "images" / split / f"ADE_{split}_{i:08d}.jpg"), img)
            _write_image(str(root / "annotations" / split / f"ADE_{split}_{i:08d}.png"), label)
    return root
