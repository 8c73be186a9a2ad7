"""visionzoo: faithful, fast vision backbones as first-class timm models.

Importing the package registers every variant with timm, so ``timm.create_model("vim_small")``
works after ``import visionzoo``. Optional accelerators (mamba-ssm, causal-conv1d, Triton) are
never imported here; kernels pick them up lazily on first use.
"""
from timm import create_model, list_models as _timm_list_models

from . import models  # noqa: F401  (registers the models with timm)
from .models import VISIONZOO_MODELS

__version__ = "0.1.0.dev0"


def list_models(filter: str = "", **kwargs):
    """Names of the registered visionzoo models (timm's ``list_models`` restricted to visionzoo)."""
    names = _timm_list_models(filter or "*", **kwargs)
    return [n for n in names if n in VISIONZOO_MODELS]


__all__ = ["create_model", "list_models", "__version__"]
