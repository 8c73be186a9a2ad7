"""Bridge to NATTEN's ``na2d_av`` (releases up to 0.17.x; 0.20+ removed it). Imported lazily."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .._dispatch import optional_import


def _load() -> Optional[Callable]:
    # (NATTEN 0.17 probes CUDA at import and may raise on machines without one: then not available)
    return optional_import("natten.functional", "na2d_av")


def natten_available() -> bool:
    return _load() is not None


def na2d_av_natten(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    fn = _load()
    if fn is None:
        raise RuntimeError("neighborhood_aggregation: the 'natten' backend needs natten<0.20 (with na2d_av)")
    return fn(attn, value, kernel_size=kernel_size)
