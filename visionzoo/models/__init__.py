"""visionzoo model families; importing this module registers every variant with timm."""
from ._registry import VISIONZOO_MODELS, ModelMeta
from . import vim
from . import patnet
from . import biformer
from . import dependencyvit
from . import overlock
from . import sparsifiner

__all__ = ["VISIONZOO_MODELS", "ModelMeta"]
