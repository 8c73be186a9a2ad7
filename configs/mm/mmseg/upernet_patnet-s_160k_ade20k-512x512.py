"""UPerNet, 160k iterations, 512x512 crops, with patnet_s on ADE20K (mmseg 1.x).

PATNet (CVPR 2025) has no official ADE20K setup; same recipe as the other hierarchical families.
Data: mmseg's standard layout, data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}.
Schedule: mmseg's 160k with the Swin-style AdamW recipe (lr 6e-5, weight decay 0.01, 1500 warm-up
iterations, poly decay); check it against the paper's
official config before comparing numbers.
"""
_base_ = [
    "mmseg::_base_/models/upernet_r50.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/schedules/schedule_160k.py",
    "mmseg::_base_/default_runtime.py",
]
custom_imports = dict(imports=["visionzoo.mm"], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type="visionzoo.Backbone",
        model_name="patnet_s",
        drop_path_rate=0.2,
        model_kwargs=dict(),
        pretrained=True,
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
