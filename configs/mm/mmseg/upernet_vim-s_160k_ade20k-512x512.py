"""UPerNet, 160k iterations, 512x512 crops, with vim_small on ADE20K (mmseg 1.x).

Vim (ICML 2024), ADE20K: blocks 5/11/17/23 through the simple feature pyramid (official seg backbone).
Recipe and data layout: _base_/upernet_visionzoo_160k_ade20k-512x512.py.
"""
_base_ = ["./_base_/upernet_visionzoo_160k_ade20k-512x512.py"]

model = dict(
    backbone=dict(model_name="vim_small", drop_path_rate=0.1),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384),
)
optim_wrapper = dict(constructor="visionzoo.LayerDecayOptimizerConstructor",
                     paramwise_cfg=dict(layer_decay_rate=0.9))  # plain backbone
