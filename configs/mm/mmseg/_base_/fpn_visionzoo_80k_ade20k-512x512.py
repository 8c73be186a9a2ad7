"""Semantic FPN, 80k iterations, 512x512 crops, a visionzoo backbone on ADE20K (mmseg 1.x): the part every
fpn_*_80k_ade20k-512x512.py config shares.

The PVT / BiFormer semantic-FPN recipe: AdamW lr 2e-4, weight decay 1e-4, poly decay (power 0.9),
80k iterations at batch 2 x 8 GPUs. Each family's config names the backbone, the neck's input widths and
its optimizer's paramwise rule (no decay on norms and biases for hierarchical backbones, layer-wise lr
decay 0.9 for plain ones).
Data: data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}.
"""
_base_ = [
    "mmseg::_base_/models/fpn_r50.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/schedules/schedule_80k.py",
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
        model_kwargs=dict(),
        pretrained=True,
    ),
    decode_head=dict(num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
)
param_scheduler = [
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=80000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
