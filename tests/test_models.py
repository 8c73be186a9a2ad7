"""The model contract, checked for every registered visionzoo model (DESIGN.md §2).

Every variant is built on the meta device (parameter counts against the official numbers); the
``test_*`` variants run forward/backward/features/FX checks at small sizes so the suite stays fast.
A family is covered the moment it registers.
"""
import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import visionzoo
from visionzoo.models import VISIONZOO_MODELS

ALL_MODELS = sorted(VISIONZOO_MODELS)
TEST_MODELS = [n for n in ALL_MODELS if n.startswith("test_")]


def _input(model, batch=1):
    size = model.pretrained_cfg["input_size"]
    return torch.randn(batch, *size)


def _build(name, **kwargs):
    model = timm.create_model(name, **kwargs)
    return model.eval()


def test_every_family_has_a_test_variant():
    families = {m.family for m in VISIONZOO_MODELS.values()}
    test_families = {VISIONZOO_MODELS[n].family for n in TEST_MODELS}
    assert families == test_families


def test_list_models_matches_registry():
    assert visionzoo.list_models() == ALL_MODELS
    assert set(ALL_MODELS) <= set(timm.list_models())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_meta_construction_and_param_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    expected = VISIONZOO_MODELS[name].params
    if expected is not None:
        assert n_params == expected, f"{name}: {n_params:,} parameters, official {expected:,}"
    assert model.num_classes == 1000
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "first_conv", "classifier", "origin_url"):
        assert cfg.get(key) is not None, f"{name}: pretrained_cfg lacks {key}"


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("vim_not_a_model")


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_and_grad_checkpointing(name):
    model = _build(name)
    x = _input(model)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes)
    assert torch.isfinite(out).all()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)  # grad enabled, so checkpointing is active
    torch.testing.assert_close(out_ckpt, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward_every_parameter_gets_a_gradient(name):
    model = timm.create_model(name, num_classes=42).train()
    assert model.num_classes == 42
    x = _input(model, batch=2)
    out = model(x)
    assert out.shape == (2, 42)
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient in {bad[:5]}"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_bf16_autocast_inference_and_training(name):
    """Mixed precision on CPU: custom ops get bf16 gradients for fp32 outputs and mixed-dtype inputs."""
    model = timm.create_model(name).train()
    x = _input(model, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x).float()).all()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_head_api(name):
    model = _build(name)
    x = _input(model, batch=2)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert model.num_features == model.head_hidden_size or pre.shape[-1] == model.head_hidden_size
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model(x))
        assert model.get_classifier() is not None

        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(out, pre)

        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.shape == feats.shape

        fresh = _build(name)
        fresh.reset_classifier(7)
        assert fresh.num_classes == 7 and fresh(x).shape == (2, 7)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_features_only(name):
    base = _build(name)
    x = _input(base, batch=2)
    n_info = len(base.feature_info)
    out_indices = tuple(range(max(0, n_info - 2), n_info))
    model = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    with torch.no_grad():
        feats = model(x)
    info = model.feature_info
    assert len(feats) == len(out_indices) == len(info.channels())
    for f, ch, red in zip(feats, info.channels(), info.reduction()):
        assert f.shape[:2] == (2, ch)
        assert f.shape[-2:] == (x.shape[-2] // red, x.shape[-1] // red), f"{name}: reduction {red}, map {tuple(f.shape)}"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_intermediates(name):
    model = _build(name)
    x = _input(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(intermediates) == len(model.feature_info)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(only) == 2
    torch.testing.assert_close(only[-1], intermediates[-1])


@pytest.mark.parametrize("name", TEST_MODELS)
def test_fx_trace_matches_eager(name):
    model = _build(name)
    x = _input(model)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        eager = model(x)
        traced = tuple(fx_model(x).values())[0]
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_non_default_input_size(name):
    base = _build(name)
    _, h, w = base.pretrained_cfg["input_size"]
    size = (h + 32, w + 64)
    model = timm.create_model(name, img_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
