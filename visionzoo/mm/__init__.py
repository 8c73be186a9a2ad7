"""OpenMMLab plugin: every visionzoo backbone in mmdet 3.x / mmseg 1.x configs.

Importing this package (through a config's ``custom_imports``) registers, in a ``visionzoo`` scope
that mmengine's registry tree reaches from mmdet's and mmseg's registries alike:

* ``visionzoo.Backbone`` (:class:`VisionZooBackbone`): any visionzoo (or timm) model as a
  ``features_only`` backbone returning a tuple of NCHW maps, with OpenMMLab's ``frozen_stages``,
  ``norm_eval``, ``with_cp`` and ``init_cfg=dict(type="Pretrained", ...)``;
* ``visionzoo.LayerDecayOptimizerConstructor``: layer-wise lr decay over visionzoo parameter names.

A config needs only::

    custom_imports = dict(imports=["visionzoo.mm"], allow_failed_imports=False)
    model = dict(..., backbone=dict(type="visionzoo.Backbone", model_name="biformer_small", ...))

This package imports mmengine only; ``import visionzoo`` never imports it (nor mmdet / mmseg).
"""
from .backbone import VisionZooBackbone
from .checkpoint import UnsafeCheckpointError, load_backbone_checkpoint
from .optim import LayerDecayOptimizerConstructor, layer_decay_groups

__all__ = [
           "LayerDecayOptimizerConstructor",
           "UnsafeCheckpointError",
           "VisionZooBackbone",
           "layer_decay_groups",
           "load_backbone_checkpoint",
]
