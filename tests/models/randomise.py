"""Shared test helper: move standard layers off their init so parity tests compare real values."""
import timm
import torch
from torch import nn


@torch.no_grad()
def randomise_standard_layer(m: nn.Module, g: torch.Generator) -> bool:
    """Randomise a Conv2d / Linear / BatchNorm2d / LayerNorm(2d) in place; False for other modules."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=g)
        if m.bias is not None:
            m.bias.normal_(0, 0.1, generator=g)
    elif isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.2, generator=g)
        m.running_mean.normal_(0, 0.2, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
    elif isinstance(m, (nn.LayerNorm, timm.layers.LayerNorm2d)):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0, 0.2, generator=g)
    else:
        return False
    return True
