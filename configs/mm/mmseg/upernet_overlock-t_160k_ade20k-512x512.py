"""UPerNet, 160k iterations, 512x512 crops, with overlock_t on ADE20K (mmseg 1.x).

OverLoCK (CVPR 2025), ADE20K: the segmentation backbone (no h_proj).
Recipe and data layout: _base_/upernet_visionzoo_160k_ade20k-512x512.py.
"""
_base_ = ["./_base_/upernet_visionzoo_160k_ade20k-512x512.py"]

model = dict(
    backbone=dict(model_name="overlock_t", drop_path_rate=0.3),
    decode_head=dict(in_channels=[64, 128, 384, 640]),
    auxiliary_head=dict(in_channels=384),
)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
