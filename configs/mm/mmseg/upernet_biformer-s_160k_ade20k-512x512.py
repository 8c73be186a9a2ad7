"""UPerNet, 160k iterations, 512x512 crops, with biformer_small on ADE20K (mmseg 1.x).

BiFormer (CVPR 2023), ADE20K: n_win=8 routing regions, auto_pad.
Recipe and data layout: _base_/upernet_visionzoo_160k_ade20k-512x512.py.
"""
_base_ = ["./_base_/upernet_visionzoo_160k_ade20k-512x512.py"]

model = dict(
    backbone=dict(model_name="biformer_small", drop_path_rate=0.3, model_kwargs=dict(n_win=8)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256),
)
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
