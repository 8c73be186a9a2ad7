"""Mask R-CNN 1x (12 epochs) with overlock_t on COCO 2017 (mmdet 3.x).

OverLoCK (Lou & Yu, CVPR 2025), COCO detection: context-fused stride-32 output (h_proj).
Recipe, data layout and weights: _base_/mask-rcnn_visionzoo_fpn_1x_coco.py.
"""
_base_ = ["./_base_/mask-rcnn_visionzoo_fpn_1x_coco.py"]

model = dict(
    backbone=dict(model_name="overlock_t", drop_path_rate=0.2, model_kwargs=dict(h_proj=True)),
    neck=dict(in_channels=[64, 128, 384, 640]),
)
