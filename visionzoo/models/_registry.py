"""Metadata of every visionzoo variant: official parameter count, GMACs and paper numbers.

timm's ``PretrainedCfg`` has no fields for a paper's claims, so they live here, keyed by model
name. The contract tests recount parameters against ``params`` and the model table is generated
from this registry. ``params=None`` marks variants without an official count (the ``test_*`` ones).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelMeta:
    family: str
    params: int | None = None  # exact official nn.Parameter count at num_classes=1000
    gmacs: float | None = None  # GMACs at the default input size, custom ops counted
    paper_top1: float | None = None  # ImageNet-1k top-1 reported by the paper / official README
    origin_url: str | None = None
    license: str | None = None
    weights: str | None = None  # where official weights live, or None when none were released
    paper_gmacs: float | None = None  # GMACs ("GFLOPs") the paper reports at 224; None where it reports none


VISIONZOO_MODELS: dict[str, ModelMeta] = {}


def register_meta(name: str, meta: ModelMeta) -> None:
    if name in VISIONZOO_MODELS:
        raise ValueError(f"visionzoo model {name!r} registered twice")
    VISIONZOO_MODELS[name] = meta
