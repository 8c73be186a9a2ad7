"""UPerNet, 160k iterations, 512x512 crops, with patnet_s on ADE20K (mmseg 1.x).

PATNet (CVPR 2025) has no official ADE20K setup; same recipe as the other hierarchical families.
Recipe and data layout: _base_/upernet_visionzoo_160k_ade20k-512x512.py.
"""
_base_ = ["./_base_/upernet_visionzoo_160k_ade20k-512x512.py"]

model = dict(
    backbone=dict(model_name="patnet_s", drop_path_rate=0.2),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
