"""Parameter and MAC counting that sees visionzoo's custom ops.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions; visionzoo's kernels
(e.g. the selective scan) are registered as torch custom ops with their own FLOP formulas, so they
are counted too instead of silently contributing zero. Elementwise ops and norms are not counted,
as in fvcore and the papers' tables. Counting runs on the meta device by default, so even the
largest variants are counted without allocating them.

MACs = FLOPs / 2 (papers call MACs "FLOPs").
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(
    model: nn.Module | str,
    input_size: Sequence[int] | None = None,
    device: str | torch.device = "meta",
    **create_kwargs,
) -> int:
    """MACs of one forward pass of ``model`` on a (B, C, H, W) input.

    Args:
        model: a module, or a model name built with ``timm.create_model(name, **create_kwargs)``
            on ``device``.
        input_size: (B, C, H, W); default: batch 1 at the model's ``pretrained_cfg["input_size"]``.
        device: where to build / run; ``"meta"`` needs no memory.
    """
    if isinstance(model, str):
        with torch.device(device):
            model = timm.create_model(model, **create_kwargs)
    model = model.eval()
    if input_size is None:
        input_size = (1, *model.pretrained_cfg["input_size"])
    x = torch.zeros(*input_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2
