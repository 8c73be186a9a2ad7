"""Object detection and instance segmentation: torchvision's detectors over any backbone.

Everything here is torchvision's (``torchvision.models.detection``: Faster R-CNN, Mask R-CNN,
RetinaNet, FCOS; ``torchvision.ops.FeaturePyramidNetwork``); visionzoo only supplies the backbone
(:class:`visionzoo.tasks.backbone.PyramidBackbone`: ``timm.create_model(features_only=True)``, plus
the simple feature pyramid for plain models) and picks the FPN levels each detector family uses:

* R-CNNs: strides 4-32 -> P2-P5 plus a max-pooled P6 (``LastLevelMaxPool``), RoIAlign on P2-P5;
* RetinaNet / FCOS: strides 8-32 -> P3-P5 plus P6/P7 convs (``LastLevelP6P7``).

Labels follow torchvision: class ``k`` of ``num_classes`` foreground classes is label ``k + 1``; label
0 is background (R-CNNs) or unused (RetinaNet, FCOS), so every detector is built with
``num_classes + 1`` outputs and the same targets train any of them.

Sizes are configurable because the torchvision defaults (800-1333 px inputs, 32-512 px anchors,
256-channel FPN, 1024-wide box head) are for COCO; the CPU demo uses small images, small anchors and
a narrow FPN.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .backbone import PyramidBackbone

__all__ = ["DETECTORS", "Detector", "BackboneWithFPN"]

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")
_RCNN = ("faster_rcnn", "mask_rcnn")


class BackboneWithFPN(nn.Module):
    """Pyramid backbone + torchvision FPN, in the form torchvision detectors take.

    Forward: (B, 3, H, W) -> ``OrderedDict`` of (B, out_channels, H / s, W / s) maps, keys "0", "1",
    ... and "pool" / "p6", "p7" for the extra levels. ``out_channels`` is read by the detectors.
    """

    def __init__(self, backbone: PyramidBackbone, out_channels: int, extra: str):
        super().__init__()
        self.body = backbone
        if extra == "pool":
            extra_blocks = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_blocks = LastLevelP6P7(out_channels, out_channels)  # from P5, as torchvision's v2 models
        else:
            raise ValueError(f"BackboneWithFPN: extra must be 'pool' or 'p6p7', got {extra!r}")
        self.fpn = FeaturePyramidNetwork(list(backbone.out_channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _anchor_generator(detector: str, sizes: Sequence[float]) -> AnchorGenerator:
    if detector in _RCNN:
        return AnchorGenerator(tuple((float(s),) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    if detector == "retinanet":  # three scales per octave, as torchvision's retinanet_resnet50_fpn
        return AnchorGenerator(tuple(tuple(float(s) * 2 ** (k / 3) for k in range(3)) for s in sizes),
                               ((0.5, 1.0, 2.0),) * len(sizes))
    return AnchorGenerator(tuple((float(s),) for s in sizes), ((1.0,),) * len(sizes))  # FCOS: one point


_DEFAULT_ANCHORS = {"faster_rcnn": (32, 64, 128, 256, 512), "mask_rcnn": (32, 64, 128, 256, 512),
                    "retinanet": (32, 64, 128, 256, 512), "fcos": (8, 16, 32, 64, 128)}


class Detector(nn.Module):
    """A torchvision detector over a timm / visionzoo backbone.

    Args:
        model: backbone name (``timm.create_model`` name).
        num_classes: foreground classes (labels 1..num_classes).
        detector: ``'faster_rcnn'``, ``'mask_rcnn'``, ``'retinanet'`` or ``'fcos'``.
        pretrained: backbone pretrained weights.
        fpn_channels: FPN width (torchvision: 256).
        anchor_sizes: one base size per pyramid level (5 levels); ``None`` for torchvision's.
        representation_size: R-CNN box-head MLP width (torchvision: 1024).
        mask_head_channels: Mask R-CNN mask-head width (torchvision: 256).
        image_mean, image_std: normalisation applied by the detector's transform (inputs in [0, 1]).
        min_size, max_size: the detector transform resizes the short side to ``min_size`` (capped by
            ``max_size`` on the long side), as torchvision does.
        backbone_kwargs: passed to ``timm.create_model``.
        **detector_kwargs: passed to the torchvision detector (``box_batch_size_per_image``,
            ``score_thresh``, ``detections_per_img``, ...).
    Forward:
        training: ``(images: list of (3, H, W), targets: list of dicts) -> dict of losses``;
        eval: ``images -> list of {"boxes", "labels", "scores"[, "masks"]}``.
    """

    def __init__(
        self,
        model: str,
        num_classes: int,
        detector: str = "faster_rcnn",
        pretrained: bool = False,
        fpn_channels: int = 256,
        anchor_sizes: Optional[Sequence[float]] = None,
        representation_size: int = 1024,
        mask_head_channels: int = 256,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        min_size: int = 800,
        max_size: int = 1333,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs: Any,
    ):
        super().__init__()
        if detector not in DETECTORS:
            raise ValueError(f"Detector: detector must be one of {DETECTORS}, got {detector!r}")
        self.detector_name = detector
        self.num_classes = num_classes
        rcnn = detector in _RCNN
        body = PyramidBackbone(model, pretrained, out_strides=(4, 8, 16, 32) if rcnn else (8, 16, 32),
                               **(backbone_kwargs or {}))
        backbone = BackboneWithFPN(body, fpn_channels, "pool" if rcnn else "p6p7")
        anchors = _anchor_generator(detector, anchor_sizes or _DEFAULT_ANCHORS[detector])
        n_anchors = anchors.num_anchors_per_location()[0]
        common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std))
        n_out = num_classes + 1
        if rcnn:
            roi = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
            kwargs = dict(
                rpn_anchor_generator=anchors, rpn_head=RPNHead(fpn_channels, n_anchors),
                box_roi_pool=roi,
                box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                box_predictor=FastRCNNPredictor(representation_size, n_out),
            )
            if detector == "mask_rcnn":
                kwargs.update(
                    mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
                    mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, n_out),
                )
                self.detector = MaskRCNN(backbone, None, **common, **kwargs, **detector_kwargs)
            else:
                self.detector = FasterRCNN(backbone, None, **common, **kwargs, **detector_kwargs)
        elif detector == "retinanet":
            head = RetinaNetHead(fpn_channels, n_anchors, n_out)
            self.detector = RetinaNet(backbone, n_out, anchor_generator=anchors, head=head, **common, **detector_kwargs)
        else:
            head = FCOSHead(fpn_channels, n_anchors, n_out)
            self.detector = FCOS(backbone, n_out, anchor_generator=anchors, head=head, **common, **detector_kwargs)

    @property
    def timm_model(self) -> nn.Module:
        return self.detector.backbone.body.timm_model

    @property
    def with_masks(self) -> bool:
        return self.detector_name == "mask_rcnn"

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        return self.detector(images, targets)
