"""Mask R-CNN 1x (12 epochs) with patnet_det_s on COCO 2017 (mmdet 3.x).

PATNet / PartialNet (CVPR 2025), COCO detection: the FasterNet-width detection backbone.
Recipe, data layout and weights: _base_/mask-rcnn_visionzoo_fpn_1x_coco.py.
"""
_base_ = ["./_base_/mask-rcnn_visionzoo_fpn_1x_coco.py"]

model = dict(
    backbone=dict(model_name="patnet_det_s", drop_path_rate=0.1),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
