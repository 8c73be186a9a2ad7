"""Image classification: the backbone with its own timm head (``timm.create_model(num_classes=...)``).

Nothing is written here beyond picking ``dynamic_img_size=True`` for plain models, so a Vim or
DependencyViT classifier takes the data set's image size without re-creating position embeddings.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .backbone import create_backbone_model

__all__ = ["build_classifier"]


def build_classifier(model: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model, num_classes=num_classes, ...)``; the model is its own ``timm_model``."""
    return create_backbone_model(model, pretrained=pretrained, num_classes=num_classes, **kwargs)
