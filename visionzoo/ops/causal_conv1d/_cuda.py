"""``cuda`` backend: bridge to the causal-conv1d package's kernel (github.com/Dao-AILab/causal-conv1d,
BSD-3), imported lazily on first use; any import error makes the backend unavailable."""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

from torch import Tensor

_UNSET = object()
_cuda_fn: object = _UNSET


def load() -> Optional[Callable]:
    """causal-conv1d's ``causal_conv1d_fn`` or None (cached)."""
    global _cuda_fn
    if _cuda_fn is _UNSET:
        fn = None
        try:
            if importlib.util.find_spec("causal_conv1d") is not None:
                from causal_conv1d import causal_conv1d_fn as fn
        except Exception:  # noqa: BLE001 - a broken install must not break visionzoo
            fn = None
        _cuda_fn = fn
    return _cuda_fn


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return load()(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                  activation=None if activation == "none" else activation)
