"""Mask R-CNN 1x (12 epochs) with a visionzoo backbone on COCO 2017 (mmdet 3.x): the part every
mask-rcnn_*_fpn_1x_coco.py config shares; each family's config names the backbone and the neck's widths.

Data: mmdet's standard layout, data/coco/{annotations,train2017,val2017}.
Schedule: mmdet's 1x (12 epochs, steps at 8 and 11, batch 2 x 8 GPUs) with AdamW lr 1e-4, weight decay
0.05 and no decay on norms / biases, the common recipe for transformer / hybrid backbones; check it
against each paper's official config before comparing numbers.
Weights: ``pretrained=True`` loads the official ImageNet weights through timm; for a local file use
``init_cfg=dict(type="Pretrained", checkpoint=PATH)`` instead (tensors only, any official layout).
"""
_base_ = [
    "mmdet::_base_/models/mask-rcnn_r50_fpn.py",
    "mmdet::_base_/datasets/coco_instance.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionzoo.mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="visionzoo.Backbone",
        out_indices=(0, 1, 2, 3),
        model_kwargs=dict(),
        pretrained=True,
    ),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
)
