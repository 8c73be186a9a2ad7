"""The input-size bookkeeping timm keeps beside a model (its "traits", timm >= 1.0.2x).

timm records the size a model was built for in ``model._traits`` (read by
``timm.models.get_model_input_config`` and by ``push_to_hf_hub``); a model that changes its native size
in ``set_input_size`` must update that record, as timm's own ViTs do. Older timm keeps no traits.
"""
from __future__ import annotations

from typing import Tuple, Union

from torch import nn

try:
    from timm.models._input import update_model_input_size
except ImportError:  # timm without model traits
    update_model_input_size = None


def record_input_size(model: nn.Module, img_size: Union[int, Tuple[int, int]]) -> None:
    """Record ``img_size`` as ``model``'s native input size in timm's traits (a no-op on older timm)."""
    if update_model_input_size is not None:
        update_model_input_size(model, img_size)
