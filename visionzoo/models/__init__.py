"""visionzoo model families; importing this module registers every variant with timm."""
from ._registry import VISIONZOO_MODELS, ModelMeta
from . import biformer, dependencyvit, overlock, patnet, sparsifiner, vim  # noqa: F401  (register with timm)

__all__ = ["VISIONZOO_MODELS", "ModelMeta"]
