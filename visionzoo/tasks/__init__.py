"""Task models built from any backbone (DESIGN §4).

* classification: the backbone's own timm head (:func:`build_classifier`);
* detection / instance segmentation: torchvision's Faster R-CNN, Mask R-CNN, RetinaNet and FCOS over
  an FPN on the backbone's features (:class:`Detector`);
* semantic segmentation: smp's UPerNet / FPN decoders + an auxiliary FCN head (:class:`Segmenter`).

:func:`build_task_model` is the single entry point the tools use. Training (Lightning) lives in
:mod:`visionzoo.tasks.module` and :mod:`visionzoo.tasks.train`, which need the ``train`` extra.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

from .backbone import PyramidBackbone, check_model_name, is_plain_model
from .classification import build_classifier
from .detection import DETECTORS, Detector
from .segmentation import DECODERS, Segmenter

TASKS = ("classification", "detection", "segmentation")

__all__ = ["TASKS", "DETECTORS", "DECODERS", "build_task_model", "build_classifier", "Detector", "Segmenter",
           "PyramidBackbone", "check_model_name", "is_plain_model", "timm_model_of"]


def build_task_model(task: str, model: str, num_classes: int, head: Optional[str] = None, pretrained: bool = False,
                     backbone_kwargs: Optional[Dict[str, Any]] = None, **head_kwargs: Any) -> nn.Module:
    """Build ``model`` (a timm / visionzoo name) into a ``task`` model.

    Args:
        task: ``'classification'``, ``'detection'`` or ``'segmentation'``.
        num_classes: classes to predict (detection: foreground classes).
        head: detector (``faster_rcnn``, ``mask_rcnn``, ``retinanet``, ``fcos``) or decoder (``upernet``,
            ``fpn``); ignored for classification.
        backbone_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ...).
        **head_kwargs: passed to :class:`Detector` / :class:`Segmenter`.
    """
    check_model_name(model)
    if task == "classification":
        return build_classifier(model, num_classes, pretrained, **(backbone_kwargs or {}))
    if task == "detection":
        return Detector(model, num_classes, detector=head or "faster_rcnn", pretrained=pretrained,
                        backbone_kwargs=backbone_kwargs, **head_kwargs)
    if task == "segmentation":
        return Segmenter(model, num_classes, decoder=head or "upernet", pretrained=pretrained,
                         backbone_kwargs=backbone_kwargs, **head_kwargs)
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def timm_model_of(task_model: nn.Module) -> nn.Module:
    """The timm model inside a task model (the module whose ``group_matcher`` drives layer decay)."""
    return getattr(task_model, "timm_model", task_model)
