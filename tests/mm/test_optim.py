"""visionzoo.LayerDecayOptimizerConstructor: groups by the family's layer order, lr scales, weight decay."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.mm


class _Detector(nn.Module):
    """A backbone plus a neck, the way mmdet / mmseg models hold them (``backbone.``, ``neck.``)."""

    def __init__(self, model_name: str):
        super().__init__()
        from mmengine.registry import MODELS

        import visionzoo.mm  # noqa: F401

        self.backbone = MODELS.build(dict(type="visionzoo.Backbone", model_name=model_name))
        self.neck = nn.Conv2d(self.backbone.out_channels[-1], 8, 1)


def _build_optimizer(model, rate=0.5, lr=1.0, wd=0.05):
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type="visionzoo.LayerDecayOptimizerConstructor",
        optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=lr, weight_decay=wd)),
        paramwise_cfg=dict(layer_decay_rate=rate),
    ))
    return constructor(model).optimizer


def test_vim_layers_follow_blocks_and_head_keeps_base_lr():
    model = _Detector("test_vim")  # stem, 3 blocks -> layers 0..3, everything else layer 4
    groups = _build_optimizer(model).param_groups
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    wd_of = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    p = "backbone.body.model."
    assert lr_of[p + "patch_embed.proj.weight"] == pytest.approx(0.5 ** 4)
    assert lr_of[p + "pos_embed"] == pytest.approx(0.5 ** 4)
    assert lr_of[p + "blocks.0.mixer.in_proj.weight"] == pytest.approx(0.5 ** 3)
    assert lr_of[p + "blocks.2.mixer.in_proj.weight"] == pytest.approx(0.5 ** 1)
    assert lr_of["neck.weight"] == pytest.approx(1.0)
    assert lr_of["backbone.pyramid.samplers.0.0.weight"] == pytest.approx(1.0)
    # no decay on 1-d parameters and on the model's no_weight_decay() names
    assert wd_of[p + "pos_embed"] == 0.0 and wd_of[p + "blocks.0.mixer.D"] == 0.0 and wd_of["neck.bias"] == 0.0
    assert wd_of[p + "blocks.0.mixer.in_proj.weight"] == 0.05 and wd_of["neck.weight"] == 0.05
    # every trainable parameter exactly once
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, q in model.named_parameters() if q.requires_grad)


def test_hierarchical_groups_match_timm_layer_decay():
    """The backbone part of the grouping is timm's own param_groups_layer_decay on the timm model, one
    layer further from the top: timm's top group is the model's last layer (scale 1), here the neck and
    heads are (BEiT's mmseg convention), so every backbone scale carries one more factor."""
    from timm.optim import param_groups_layer_decay

    model = _Detector("test_biformer")
    ours = {n: g["lr"] for g in _build_optimizer(model, rate=0.7).param_groups for n in g["param_names"]}
    timm_groups = param_groups_layer_decay(model.backbone.timm_model, weight_decay=0.05, layer_decay=0.7)
    prefix = "backbone.body.model."
    named = {id(q): n for n, q in model.backbone.timm_model.named_parameters()}
    checked = 0
    for g in timm_groups:
        for q in g["params"]:
            assert ours[prefix + named[id(q)]] == pytest.approx(g["lr_scale"] * 0.7), named[id(q)]
            checked += 1
    assert checked == sum(1 for _ in model.backbone.timm_model.parameters())


def test_frozen_parameters_are_left_out_and_bad_cfg_is_refused():
    from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

    frozen = MODELS.build(dict(type="visionzoo.Backbone", model_name="test_patnet", frozen_stages=1))
    groups = _build_optimizer(frozen).param_groups
    names = {n for g in groups for n in g["param_names"]}
    assert not any(n.startswith(("body.model.patch_embed.", "body.model.stages.0.")) for n in names)
    with pytest.raises(ValueError, match="paramwise_cfg needs layer_decay_rate"):
        OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
            type="visionzoo.LayerDecayOptimizerConstructor",
            optim_wrapper_cfg=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0)),
            paramwise_cfg=dict(decay_rate=0.9)))(frozen)
    with pytest.raises(ValueError, match="no visionzoo.Backbone"):
        _build_optimizer(nn.Linear(2, 2))


def test_a_training_step_uses_the_scaled_rates():
    model = _Detector("test_dependencyvit")
    optimizer = _build_optimizer(model, rate=0.5, lr=1e-3)
    out = model.neck(model.backbone(torch.randn(1, 3, 32, 32))[-1])
    out.square().mean().backward()
    optimizer.step()
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3 * 0.5 ** 4)
