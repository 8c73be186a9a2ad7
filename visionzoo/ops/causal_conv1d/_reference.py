"""``reference`` backend: the causal depthwise conv as ``F.conv1d`` (``groups=dim``, ``K - 1`` zeros of
padding, cropped to ``L``). It defines the semantics; differentiated by ordinary autograd."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def activate(y: Tensor, activation: str) -> Tensor:
    return F.silu(y) if activation == "silu" else y


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    dim, K = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=K - 1, groups=dim)[..., : x.shape[-1]]
    return activate(y, activation)
