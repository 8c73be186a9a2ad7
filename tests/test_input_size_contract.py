"""The input-size contract in timm's terms, on the ``test_*`` variants (fast).

timm's own ``tests/test_models.py`` (run over every model by ``benchmarks/run_timm_model_tests.py``)
reads ``fixed_input_size`` from the pretrained cfg: a model that says ``False`` must take the smaller
sizes timm feeds it; a model that says ``True`` is built for one size, and ``img_size=`` (what
``resolve_model_input_args`` passes), ``set_input_size`` and ``dynamic_img_size`` are how it gets another.
"""
import pytest
import timm
import torch
from timm.models import get_model_input_config, resolve_model_input_args

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS

TEST_MODELS = sorted(n for n in VISIONZOO_MODELS if n.startswith("test_"))
FIXED = {"test_vim", "test_biformer", "test_sparsifiner", "test_dependencyvit", "test_dependencyvit_lite"}
DYNAMIC = ("test_vim", "test_sparsifiner", "test_dependencyvit")  # plain models: dynamic_img_size=True


def _cfg_size(name):
    return tuple(timm.models.get_pretrained_cfg(name).input_size[1:])


def _forward(model, size, batch=1):
    with torch.no_grad():
        return model(torch.randn(batch, 3, *size))


def test_fixed_input_size_flags():
    assert {n for n in TEST_MODELS if timm.models.get_pretrained_cfg(n).fixed_input_size} == FIXED
    for name in VISIONZOO_MODELS:  # every variant of a family says the same
        family_test = f"test_{VISIONZOO_MODELS[name].family}"
        assert (timm.models.get_pretrained_cfg(name).fixed_input_size
                == timm.models.get_pretrained_cfg(family_test).fixed_input_size), name


@pytest.mark.parametrize("name", sorted(set(TEST_MODELS) - FIXED))
def test_flexible_models_take_the_sizes_timm_feeds(name):
    """Built at the cfg size, fed smaller and larger inputs (timm's tests feed 96 / 128 to 224 models)."""
    model = timm.create_model(name).eval()
    h, w = _cfg_size(name)
    for size in ((h // 2, w // 2), (h + 32, w + 64)):
        assert _forward(model, size).shape == (1, 1000)
    assert get_model_input_config(model)["fixed_input_size"] is False


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_models_follow_img_size_and_set_input_size(name):
    h, w = _cfg_size(name)
    new = (h + 32, w + 64)
    args = resolve_model_input_args(name, {"img_size": new})  # what timm's scripts do with --img-size
    assert tuple(args["img_size"]) == new
    model = timm.create_model(name, img_size=new).eval()
    assert _forward(model, new).shape == (1, 1000)
    assert get_model_input_config(model) == dict(input_size=(3, *new), fixed_input_size=True,
                                                 first_conv=model.pretrained_cfg["first_conv"])

    model = timm.create_model(name).eval()
    model.set_input_size(new)
    assert _forward(model, new).shape == (1, 1000)
    assert get_model_input_config(model)["input_size"] == (3, *new)


def test_biformer_n_win_follows_the_size_it_is_built_for():
    for size, n_win in (((64, 64), (2, 2)), ((96, 160), (3, 5))):
        model = timm.create_model("test_biformer", img_size=size).eval()
        assert model.n_win == n_win
        assert _forward(model, size).shape == (1, 1000)
    model.set_input_size((128, 128))
    assert model.n_win == (4, 4) and _forward(model, (128, 128)).shape == (1, 1000)
    with pytest.raises(ValueError, match="n_win"):  # 160 / 32 = 5 regions do not split a 4-region model's grid
        _forward(model, (160, 160))
    padded = timm.create_model("test_biformer", auto_pad=True).eval()  # the dense backbones' any-size form
    assert get_model_input_config(padded)["fixed_input_size"] is False
    assert _forward(padded, (96, 160)).shape == (1, 1000)


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_img_size_takes_any_patch_multiple(name):
    model = timm.create_model(name, dynamic_img_size=True).eval()
    assert get_model_input_config(model)["fixed_input_size"] is False
    for size in ((32, 48), (80, 64)):
        assert _forward(model, size).shape == (1, 1000)


@pytest.mark.parametrize("name", ["test_biformer", "test_overlock", "test_vim", "test_patnet", "test_sparsifiner",
                                  "test_dependencyvit"])
def test_empty_batch(name):
    model = timm.create_model(name).eval()
    assert _forward(model, _cfg_size(name), batch=0).shape == (0, 1000)
    features = timm.create_model(name, features_only=True).eval()  # dense features too, same shapes but the batch
    empty, one = _forward(features, _cfg_size(name), batch=0), _forward(features, _cfg_size(name), batch=1)
    assert len(empty) == len(one) > 0 and [f.shape for f in empty] == [(0, *f.shape[1:]) for f in one]


def test_sparsifiner_default_trains_every_parameter_in_a_plain_backward():
    """The default (attention self-distillation on) is safe for DDP without find_unused_parameters."""
    model = timm.create_model("test_sparsifiner", token_pruning_loc=(), num_classes=5).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.blocks[0].attn.mask_predictor.proj_n.grad.abs().sum() > 0
    off = timm.create_model("test_sparsifiner", attn_self_distill_weight=0.0).train()
    off(torch.randn(2, 3, 64, 64)).sum().backward()
    assert off.blocks[0].attn.mask_predictor.proj_n.grad is None  # the official phase-2 setting: freeze them
