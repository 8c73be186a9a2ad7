"""UPerNet, 160k iterations, 512x512 crops, a visionzoo backbone on ADE20K (mmseg 1.x): the part every
upernet_*_160k_ade20k-512x512.py config shares.

Data: mmseg's standard layout, data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}.
Schedule: mmseg's 160k with the Swin-style AdamW recipe (lr 6e-5, weight decay 0.01, 1500 warm-up
iterations, poly decay); check it against each paper's official config before comparing numbers. Each
family's config names the backbone, the heads' input widths and its optimizer's paramwise rule (no decay
on norms and biases for hierarchical backbones, layer-wise lr decay 0.9 for plain ones).
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
        model_kwargs=dict(),
        pretrained=True,
    ),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150),
)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
