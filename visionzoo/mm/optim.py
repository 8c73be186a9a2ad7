"""Layer-wise learning-rate decay for models with a ``visionzoo.Backbone``.

The layer of a backbone parameter is its group in the family's fine ``group_matcher`` (timm's
convention, the one ``timm.optim.param_groups_layer_decay`` uses): the stem is layer 0, then blocks /
stages in forward order, the dense output norms after the stage they follow. Everything outside the
timm model (the simple feature pyramid, necks, heads) is the last layer, ``L``, with the base lr. A
parameter of layer ``i`` gets ``lr = base_lr * decay_rate ** (L - i)``. Weight decay is 0 for 1-d
parameters (norms, biases) and for the names the model's ``no_weight_decay()`` lists (position
embeddings, class tokens, ...), ``base_wd`` otherwise.

Config::

    optim_wrapper = dict(
        optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05),
        constructor="visionzoo.LayerDecayOptimizerConstructor",
        paramwise_cfg=dict(layer_decay_rate=0.9),
    )
"""
from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

from ._registry import OPTIM_WRAPPER_CONSTRUCTORS
from .backbone import VisionZooBackbone

__all__ = ["LayerDecayOptimizerConstructor", "layer_decay_groups"]

_KNOWN_KEYS = {"layer_decay_rate"}


def layer_decay_groups(model: nn.Module, base_lr: float, base_wd: float, decay_rate: float) -> list[dict]:
    """Parameter groups (``params``, ``lr``, ``weight_decay``, ``layer_id``, ``lr_scale``, ``param_names``)
    for every trainable parameter of ``model``, which must contain a :class:`VisionZooBackbone`."""
    backbones = [(name, m) for name, m in model.named_modules() if isinstance(m, VisionZooBackbone)]
    if not backbones:
        raise ValueError("LayerDecayOptimizerConstructor: the model has no visionzoo.Backbone to take layers from")
    layer_of: dict[str, int] = {}
    no_decay: set = set()
    num_layers = 0
    per_backbone = []
    for name, backbone in backbones:
        ids, n = backbone.layer_ids()
        prefix = (name + "." if name else "") + "body.model."
        per_backbone.append((prefix, ids))
        num_layers = max(num_layers, n)
        skip = getattr(backbone.timm_model, "no_weight_decay", None)
        no_decay.update(prefix + k for k in (skip() if callable(skip) else ()))
    for prefix, ids in per_backbone:
        layer_of.update({prefix + k: i for k, i in ids.items()})

    groups: dict[tuple, dict] = {}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of.get(pname, num_layers)
        decay = not (param.ndim <= 1 or pname in no_decay)
        key = (layer, decay)
        if key not in groups:
            scale = decay_rate ** (num_layers - layer)
            groups[key] = dict(params=[], param_names=[], layer_id=layer, lr_scale=scale,
                               lr=base_lr * scale, weight_decay=base_wd if decay else 0.0)
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(pname)
    return [groups[k] for k in sorted(groups)]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """mmengine optimizer-wrapper constructor with layer-wise lr decay over visionzoo parameter names.

    ``paramwise_cfg=dict(layer_decay_rate=r)`` (required). See the module docstring for the rule.
    """

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        unknown = set(self.paramwise_cfg) - _KNOWN_KEYS
        if unknown or "layer_decay_rate" not in self.paramwise_cfg:
            raise ValueError(f"LayerDecayOptimizerConstructor: paramwise_cfg needs layer_decay_rate and takes "
                             f"nothing else, got {sorted(self.paramwise_cfg)}")
        rate = float(self.paramwise_cfg["layer_decay_rate"])
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"LayerDecayOptimizerConstructor: layer_decay_rate must be in (0, 1], got {rate}")
        params.extend(layer_decay_groups(module, self.base_lr, self.base_wd or 0.0, rate))
