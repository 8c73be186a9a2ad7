"""Cascade Mask R-CNN 1x with Vim-S (plain backbone + simple feature pyramid) on COCO 2017 (mmdet 3.x).

Vim (Zhu et al., ICML 2024) reports COCO detection with Cascade Mask R-CNN on a ViTDet-style simple
feature pyramid over the plain backbone. Here the pyramid is visionzoo's ``SimpleFeaturePyramid`` over
the four blocks the official dense backbone taps (5, 11, 17, 23: one block per scale, widths kept),
then mmdet's FPN. The paper's own schedule is ViTDet's (detectron2, 1024 large-scale jitter, long
schedule); this config keeps mmdet's standard 1x data pipeline and schedule, so it is a comparable
baseline, not a reproduction of the paper's number. Layer-wise lr decay 0.9 (visionzoo constructor).
Data: data/coco/{annotations,train2017,val2017}.
"""
_base_ = [
    "mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionzoo.mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="visionzoo.Backbone",
        model_name="vim_small",
        out_indices=(5, 11, 17, 23),
        pyramid="auto",
        drop_path_rate=0.1,
        pretrained=True,
    ),
    neck=dict(in_channels=[384, 384, 384, 384]),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="visionzoo.LayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay_rate=0.9),
)
