"""RetinaNet 1x (12 epochs) with biformer_small on COCO 2017 (mmdet 3.x).

BiFormer (Zhu et al., CVPR 2023), COCO detection: n_win=16 routing regions, auto_pad.
Data: mmdet's standard layout, data/coco/{annotations,train2017,val2017}.
Schedule: mmdet's 1x (12 epochs, steps at 8 and 11, batch 2 x 8 GPUs) with AdamW lr 1e-4, weight decay
0.05 and no decay on norms / biases, the common recipe for transformer / hybrid backbones; check it
against the paper's official config before comparing numbers.
Weights: ``pretrained=True`` loads the official ImageNet weights through timm; for a local file use
``init_cfg=dict(type="Pretrained", checkpoint=PATH)`` instead (tensors only, any official layout).
"""
_base_ = [
    "mmdet::_base_/models/retinanet_r50_fpn.py",
    "mmdet::_base_/datasets/coco_detection.py",
    "mmdet::_base_/schedules/schedule_1x.py",
    "mmdet::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionzoo.mm"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type="visionzoo.Backbone",
        model_name="biformer_small",
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        model_kwargs=dict(n_win=16),
        pretrained=True,
    ),
    neck=dict(in_channels=[64, 128, 256, 512], start_level=1, add_extra_convs="on_input"),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
)
