"""Mask R-CNN 1x (12 epochs) with biformer_small on COCO 2017 (mmdet 3.x).

BiFormer (Zhu et al., CVPR 2023), COCO detection: n_win=16 routing regions, auto_pad.
Recipe, data layout and weights: _base_/mask-rcnn_visionzoo_fpn_1x_coco.py.
"""
_base_ = ["./_base_/mask-rcnn_visionzoo_fpn_1x_coco.py"]

model = dict(
    backbone=dict(model_name="biformer_small", drop_path_rate=0.2, model_kwargs=dict(n_win=16)),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
