"""Bridge to NATTEN's ``na2d_av`` (releases up to 0.17.x; 0.20+ removed it). Imported lazily."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Callable, Optional

from torch import Tensor


@lru_cache(maxsize=None)
def _load() -> Optional[Callable]:
    if importlib.util.find_spec("natten") is None:
        return None
    try:  # NATTEN 0.17 probes CUDA at import and may raise on machines without one
        from natten.functional import na2d_av
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return na2d_av


def natten_available() -> bool:
    return _load() is not None


def na2d_av_natten(attn: Tensor, value: Tensor, kernel_size: int) -> Tensor:
    fn = _load()
    if fn is None:
        raise RuntimeError("neighborhood_aggregation: the 'natten' backend needs natten<0.20 (with na2d_av)")
    return fn(attn, value, kernel_size=kernel_size)
