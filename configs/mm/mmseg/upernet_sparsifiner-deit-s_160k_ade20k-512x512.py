"""UPerNet, 160k iterations, 512x512 crops, with sparsifiner_deit_small on ADE20K (mmseg 1.x).

Sparsifiner (CVPR 2023) has no official ADE20K setup; plain backbone + simple feature pyramid.
Recipe and data layout: _base_/upernet_visionzoo_160k_ade20k-512x512.py.
"""
_base_ = ["./_base_/upernet_visionzoo_160k_ade20k-512x512.py"]

model = dict(
    backbone=dict(model_name="sparsifiner_deit_small", drop_path_rate=0.1),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384),
)
optim_wrapper = dict(constructor="visionzoo.LayerDecayOptimizerConstructor",
                     paramwise_cfg=dict(layer_decay_rate=0.9))  # plain backbone
