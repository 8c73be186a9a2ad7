"""The ``visionzoo`` scope in mmengine's registry tree.

mmdet's and mmseg's registries are children of mmengine's root registries. A type written
``"visionzoo.Name"`` names the scope ``visionzoo``; mmengine then looks it up among the root's
children, so registries created here with ``scope="visionzoo"`` serve mmdet and mmseg configs alike,
and neither package has to be imported to register a backbone.
"""
from mmengine.registry import MODELS as _ENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as _ENGINE_CONSTRUCTORS
from mmengine.registry import Registry

MODELS = Registry("model", parent=_ENGINE_MODELS, scope="visionzoo")
OPTIM_WRAPPER_CONSTRUCTORS = Registry("optimizer wrapper constructor", parent=_ENGINE_CONSTRUCTORS,
                                      scope="visionzoo")
