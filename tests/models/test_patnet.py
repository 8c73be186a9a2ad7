"""PATNet: parity with the official forward on official-format checkpoints (.pth and Lightning .ckpt),
BN folding, the iRPE bucket cache, dense features, input-size errors and the metadata."""
import copy
import sys
import types

import pytest
import timm
import torch
from torch import nn
from timm.utils.model import reparameterize_model

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.models import patnet as patnet_module
from visionzoo.utils import count_macs

from .randomise import randomise_standard_layer
from .patnet_official import official_bucket_ids, official_partialnet_forward


def _to_official(state_dict):
    """visionzoo keys -> the official PartialNet layout (stages.{0..6}, avgpool_pre_head.1, norm{0,2,4,6})."""
    out = {}
    for k, v in state_dict.items():
        p = k.split(".")
        if p[0] == "stages":
            i = int(p[1])
            p = ["stages", str(2 * i), "blocks"] + p[3:] if p[2] == "blocks" else ["stages", str(2 * i - 1)] + p[3:]
        elif p[0] == "conv_head":
            p = ["avgpool_pre_head", "1"] + p[1:]
        elif p[0] == "feature_norms":
            p = [f"norm{2 * int(p[1])}"] + p[2:]
        out[".".join(p)] = v.clone()
    return out


@torch.no_grad()
def _randomise(model, seed=1):
    """Move every weight, BN statistic and iRPE table off its init so parity compares real values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if randomise_standard_layer(m, g):
            continue
        if isinstance(m, patnet_module.IRPEBias):
            m.lookup_table_bias.normal_(0, 1.0, generator=g)
    return model


def _official_pth(tmp_path, model, name="model.pth"):
    """The released layout: ``train_test.py --pl_ckpt_2_torch_pth`` saves a bare ``model.state_dict()``."""
    sd = _to_official(model.state_dict())
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name), sd


def _lightning_ckpt(tmp_path, monkeypatch, model):
    """A PyTorch Lightning checkpoint as ModelCheckpoint writes it during official training.

    The hyper-parameters are pickled as Lightning's ``AttributeDict``; a stand-in module provides the
    class while saving and is removed before loading, so the load cannot import Lightning.
    """
    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
    AttributeDict.__qualname__ = "AttributeDict"
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
    sd = _to_official(model.state_dict())
    ckpt = {
        "epoch": 299,
        "global_step": 93_600,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": {"model." + k: v for k, v in sd.items()},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_acc1', 'mode': 'max'}": {
            "best_model_score": torch.tensor(71.9), "dirpath": "./model_ckpt/"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4e-3, "params": [0]}]}],
        "lr_schedulers": [{"last_epoch": 299, "base_lrs": [4e-3]}],
        "hparams_name": "hparams",
        "hyper_parameters": AttributeDict(model_name="partialnet_t0", embed_dim=32, depths=[1, 2, 8, 2],
                                          act_layer="GELU", use_spatial_attn=False, multi_scale="192_280"),
    }
    path = tmp_path / "partialnet_t0-epoch=299-val_acc1=71.9000.ckpt"
    torch.save(ckpt, path)
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
        monkeypatch.delitem(sys.modules, name)
    return str(path), sd


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()


# --- parity with the official forward -------------------------------------------------------------
@pytest.mark.parametrize("name, act, size", [
    ("patnet_t0", "gelu", (224, 224)),  # PAT_sp off
    ("patnet_t1", "gelu", (224, 160)),  # PAT_sp on, non-square
])
def test_matches_official_forward(tmp_path, name, act, size):
    src = _randomise(timm.create_model(name))
    path, official_sd = _official_pth(tmp_path, src)
    model = _load(name, path)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(x)
        ref = official_partialnet_forward(official_sd, x, act=act)
    assert ref.abs().max() > 1.0  # real signal, not the tiny logits of the 0.02 init
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_relu_variant_and_far_irpe_buckets_match_official(tmp_path):
    # 512x544 leaves a 16x17 last-stage grid: distances beyond alpha=20 use the log-spaced buckets.
    src = _randomise(timm.create_model("test_patnet", act_layer="relu"))
    path, official_sd = _official_pth(tmp_path, src)
    model = _load("test_patnet", path, act_layer="relu")
    x = torch.randn(1, 3, 512, 544)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_partialnet_forward(official_sd, x, act="relu"),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(7, 7), (2, 3), (1, 5), (16, 24), (30, 30)])
def test_irpe_buckets_equal_official(hw):
    ours = patnet_module.irpe_euclidean_buckets(*hw)
    torch.testing.assert_close(ours, official_bucket_ids(*hw).flatten(), rtol=0, atol=0)
    assert ours.min() >= 40 and ours.max() <= 80  # Euclidean distances only reach the upper half


def test_lightning_checkpoint_loads_without_lightning(tmp_path, monkeypatch):
    src = _randomise(timm.create_model("patnet_t0"))
    path, official_sd = _lightning_ckpt(tmp_path, monkeypatch, src)
    assert "pytorch_lightning" not in sys.modules
    model = _load("patnet_t0", path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_partialnet_forward(official_sd, x), rtol=1e-4, atol=1e-4)


def test_missing_key_is_a_clear_error(tmp_path):
    sd = _to_official(timm.create_model("test_patnet").state_dict())
    del sd["stages.6.blocks.0.spatial_mixing.attn.rpe_k.lookup_table_bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \[stages\.3\.blocks\.0\.spatial_mixing\.attn\.rpe_k"):
        _load("test_patnet", str(tmp_path / "broken.pth"))


def test_other_num_classes_and_in_chans_with_pretrained(tmp_path):
    src = _randomise(timm.create_model("test_patnet"))
    path, _ = _official_pth(tmp_path, src)
    model = _load("test_patnet", path, num_classes=10, in_chans=1)
    assert model.head.weight.shape == (10, 64)
    assert model.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(model.conv_head.weight, src.conv_head.weight)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


def test_visionzoo_state_dict_round_trips(tmp_path):
    src = _randomise(timm.create_model("test_patnet"))
    torch.save(src.state_dict(), tmp_path / "vz.pth")
    model = _load("test_patnet", str(tmp_path / "vz.pth"))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


# --- deploy-time BN folding --------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("test_patnet", {}),
    ("patnet_t1", {}),  # GELU + PAT_sp
    ("patnet_t2", dict(depths=(1, 1, 2, 1))),  # ReLU, no PAT_sp
])
def test_reparameterize_keeps_outputs(name, kwargs):
    model = _randomise(timm.create_model(name, **kwargs)).eval()
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
    n_before = sum(p.numel() for p in model.parameters())

    deployed = reparameterize_model(model)  # timm's walker, on a copy
    method = copy.deepcopy(model)
    method.reparameterize()
    method.reparameterize()  # idempotent
    for m in (deployed, method):
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
        assert sum(p.numel() for p in m.parameters()) < n_before
        assert m.state_dict().keys() == deployed.state_dict().keys()
    left = [n for n, m in deployed.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # Only PAT_sp's gated BN survives (a data-dependent gate sits between it and the conv before it).
    assert all(n.endswith("mlp.4.norm") for n in left), left


# --- iRPE cache -------------------------------------------------------------------------------------
def test_irpe_index_is_cached_per_size(monkeypatch):
    calls = []
    real = patnet_module.irpe_euclidean_buckets
    monkeypatch.setattr(patnet_module, "irpe_euclidean_buckets", lambda *a: calls.append(a[:2]) or real(*a))
    model = _randomise(timm.create_model("test_patnet")).eval()
    fresh = copy.deepcopy(model)
    keys = set(model.state_dict())
    rpe = model.stages[3].blocks[0].spatial_mixing.attn.rpe_k
    x64, x96 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out64 = model(x64)
        index64 = rpe.bucket_index(2, 2)
        out96 = model(x96)
        again = model(x64)
        model(x96)
    assert calls == [(2, 2), (3, 4)]  # one computation per grid size, none per forward
    assert rpe.bucket_index(2, 2) is index64
    torch.testing.assert_close(again, out64, rtol=0, atol=0)
    assert not fresh.stages[3].blocks[0].spatial_mixing.attn.rpe_k._index_cache
    with torch.no_grad():
        torch.testing.assert_close(fresh(x96), out96, rtol=0, atol=0)
    assert set(model.state_dict()) == keys  # the cache is not state


def test_img_size_prepares_the_cache_and_meta_construction_works():
    model = timm.create_model("test_patnet", img_size=(96, 128))
    rpe = model.stages[3].blocks[0].spatial_mixing.attn.rpe_k
    assert (3, 4, torch.device("cpu")) in rpe._index_cache
    with torch.device("meta"):
        meta = timm.create_model("patnet_t0", img_size=224)
    rpe = meta.stages[3].blocks[0].spatial_mixing.attn.rpe_k
    assert rpe.bucket_index(7, 7).device.type == "meta"
    assert rpe.lookup_table_bias.shape == (4, 81)


# --- dense prediction -----------------------------------------------------------------------------
def test_features_only_official_dense_norms(tmp_path):
    src = _randomise(timm.create_model("test_patnet", feature_norms=True))
    path, official_sd = _official_pth(tmp_path, src)
    assert {"norm0.weight", "norm2.running_var", "norm4.bias", "norm6.weight"} <= set(official_sd)
    model = _load("test_patnet", path, features_only=True)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        feats = model(x)
        ref = official_partialnet_forward(official_sd, x, fork_feat=True)
    for f, r, s in zip(feats, ref, (4, 8, 16, 32)):
        assert f.shape[-2:] == (64 // s, 96 // s)
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)


def test_features_only_from_classification_checkpoint(tmp_path):
    # Classification files carry no dense norms: they keep their BN init, as in the official
    # detector's non-strict load.
    path, _ = _official_pth(tmp_path, _randomise(timm.create_model("test_patnet")))
    model = _load("test_patnet", path, features_only=True, out_indices=(1, 3))
    norms = model.model.feature_norms
    assert all(isinstance(n, nn.BatchNorm2d) for n in norms)
    torch.testing.assert_close(norms[3].weight, torch.ones(128))
    assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [32, 128]


def test_det_backbones_are_fasternet_widths_with_pat_sp():
    with torch.device("meta"):
        det = timm.create_model("patnet_det_m", features_only=True)
    assert det.feature_info.channels() == [144, 288, 576, 1152]
    assert any(isinstance(m, patnet_module.PartialSpatialAttn) for m in det.modules())
    assert VISIONZOO_MODELS["patnet_det_s"].params == 41_362_992


# --- inputs and flags -----------------------------------------------------------------------------
def test_input_errors_name_the_problem():
    model = timm.create_model("test_patnet").eval()
    with pytest.raises(ValueError, match=r"at least 32x32 .* got 16x64"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"images of shape \(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        timm.create_model("test_patnet", global_pool="")
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        timm.create_model("test_patnet", num_heads=5)
    with pytest.raises(ValueError, match="at least 32x32, got img_size"):
        timm.create_model("test_patnet", img_size=16)
    with pytest.raises(ValueError, match="feature_norms=True"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), norm=True)


def test_sizes_that_are_not_multiples_of_32_floor_like_the_official_model():
    model = timm.create_model("test_patnet").eval()
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(17, 25), (8, 12), (4, 6), (2, 3)]


def test_exposed_dropouts_and_heads():
    x = torch.randn(2, 3, 64, 64)
    default = timm.create_model("test_patnet").train()
    assert default.stages[3].blocks[0].spatial_mixing.attn.attn_drop == 0.1
    assert default.stages[3].blocks[0].spatial_mixing.attn.proj_drop.p == 0.1
    torch.manual_seed(0)
    a = default(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, default(x))  # attention / projection dropout active in training
    quiet = timm.create_model("test_patnet", attn_drop=0.0, proj_drop=0.0).train()
    torch.testing.assert_close(quiet(x), quiet(x))
    six = timm.create_model("test_patnet", num_heads=6)
    assert six.stages[3].blocks[0].spatial_mixing.attn.rpe_k.lookup_table_bias.shape == (6, 81)
    a.sum().backward()
    assert default.stages[3].blocks[0].spatial_mixing.attn.rpe_k.lookup_table_bias.grad is not None


# --- metadata and registry --------------------------------------------------------------------------
def test_macs_match_registry():
    for name in ("patnet_t0", "patnet_t1"):
        assert count_macs(name) / 1e9 == pytest.approx(VISIONZOO_MODELS[name].gmacs, abs=1e-4)


def test_timm_models_are_untouched():
    from timm.models._registry import model_entrypoint  # noqa: PLC0415
    assert model_entrypoint("convnext_tiny").__module__ == "timm.models.convnext"
    assert model_entrypoint("fasternet_t0").__module__ == "timm.models.fasternet"
    for name, meta in VISIONZOO_MODELS.items():
        if meta.family == "patnet":
            assert model_entrypoint(name).__module__ == "visionzoo.models.patnet"
