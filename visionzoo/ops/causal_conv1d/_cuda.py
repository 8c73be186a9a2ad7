"""``cuda`` backend: bridge to the causal-conv1d package's kernel (github.com/Dao-AILab/causal-conv1d,
BSD-3), imported lazily on first use; any import error makes the backend unavailable."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .._dispatch import optional_import


def load() -> Optional[Callable]:
    """causal-conv1d's ``causal_conv1d_fn`` or None (cached)."""
    return optional_import("causal_conv1d", "causal_conv1d_fn")


def causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    return load()(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                  activation=None if activation == "none" else activation)
