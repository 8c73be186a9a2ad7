"""OverLoCK: parity with the official forward on official-format checkpoints (train form, _reparam, mmdet),
reparameterisation, the aux head, dense features, small maps, errors and the metadata."""
import copy

import pytest
import timm
import torch
from timm.utils.model import reparameterize_model

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.models import overlock as overlock_module
from visionzoo.utils import count_macs

from .randomise import randomise_standard_layer
from .overlock_official import OFFICIAL_CFGS, official_overlock_forward, to_official


@torch.no_grad()
def _randomise(model, seed=1):
    """Move every weight, BN statistic, LN, GRN, LayerScale and RPB off its init."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if randomise_standard_layer(m, g):
            continue
        if isinstance(m, (overlock_module.GRN,)):
            m.gamma.normal_(0, 0.3, generator=g)
            m.beta.normal_(0, 0.1, generator=g)
        elif isinstance(m, overlock_module.LayerScale):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0, 0.1, generator=g)
        elif isinstance(m, overlock_module.ContMixBlock):
            m.rpb1.normal_(0, 1.0, generator=g)
            m.rpb2.normal_(0, 1.0, generator=g)
    return model


def _train_form(name="test_overlock", **kwargs):
    return _randomise(timm.create_model(name, deploy=False, use_aux_head=True, **kwargs)).eval()


def _save(tmp_path, sd, name="official.pth", wrap="model"):
    path = tmp_path / name
    torch.save({wrap: sd, "epoch": 299} if wrap else sd, path)
    return str(path)


def _load(name, path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (160, 224)])
def test_matches_official_forward_train_file(tmp_path, size):
    """A train-form official file -> default (deploy) model and train-form model; both match the official."""
    src = _train_form()
    official_sd = to_official(src.state_dict())
    path = _save(tmp_path, official_sd)
    x = torch.randn(2, 3, *size)
    ref, ref_aux = official_overlock_forward(official_sd, x, OFFICIAL_CFGS["test_overlock"])
    assert ref.abs().max() > 1.0
    deploy = _load("test_overlock", path)
    assert all(m.deploy for m in deploy.modules() if isinstance(m, overlock_module.DilatedReparamBlock))
    train = _load("test_overlock", path, deploy=False, use_aux_head=True)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(train(x), ref, rtol=1e-4, atol=1e-4)
        out = train.train()(x)  # training mode: dict(main, aux); BN in train mode, so only check aux's shape
    assert set(out) == {"main", "aux"} and out["aux"].shape == ref_aux.shape


def test_aux_head_matches_official(tmp_path):
    src = _train_form()
    official_sd = to_official(src.state_dict())
    x = torch.randn(2, 3, 64, 64)
    _, ref_aux = official_overlock_forward(official_sd, x, OFFICIAL_CFGS["test_overlock"])
    model = _load("test_overlock", _save(tmp_path, official_sd), deploy=False, use_aux_head=True)
    with torch.no_grad():
        _, ctx, _ = model._forward(x)
        torch.testing.assert_close(model.aux_head(ctx), ref_aux, rtol=1e-4, atol=1e-4)


def test_overlock_xt_matches_official_at_224(tmp_path):
    """Real XT shapes: ContMix on 14x14 (K=13) and 7x7 (K=7) maps, no resize; deploy form from a train file."""
    src = _train_form("overlock_xt")
    official_sd = to_official(src.state_dict())
    x = torch.randn(1, 3, 224, 224)
    ref, _ = official_overlock_forward(official_sd, x, OFFICIAL_CFGS["overlock_xt"])
    model = _load("overlock_xt", _save(tmp_path, official_sd))
    # Random weights through 26 blocks give logits of ~1e4, where fp32 rounding alone (official fp32 vs
    # fp64) is ~1e-2: compare on the logit scale.
    scale = ref.abs().max().clamp(min=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x) / scale, ref / scale, rtol=1e-4, atol=1e-4)


def test_reparameterize_matches_train_form():
    model = _train_form()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = model(x)
        folded = reparameterize_model(model)  # timm's walker calls DilatedReparamBlock.reparameterize
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)
        model.reparameterize()
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    n_deploy = sum(p.numel() for p in timm.create_model("test_overlock", use_aux_head=True).parameters())
    assert sum(p.numel() for p in model.parameters()) == n_deploy


def test_reparam_file_loads_into_deploy_and_is_refused_by_train_form(tmp_path):
    src = _train_form()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        src.reparameterize()
    path = _save(tmp_path, to_official(src.state_dict()), "reparam.pth", wrap=None)  # bare state dict
    with torch.no_grad():
        torch.testing.assert_close(_load("test_overlock", path)(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="deploy=True"):
        _load("test_overlock", path, deploy=False)


def test_dense_checkpoint_and_features(tmp_path):
    """mmdet layout: backbone.-prefixed, no head / aux_head, extra_norm + h_proj; features match the official."""
    src = _randomise(timm.create_model("test_overlock", deploy=False, extra_norm=True, h_proj=True)).eval()
    official_sd = {k: v for k, v in to_official(src.state_dict()).items() if not k.startswith("head.")}
    ckpt = {"state_dict": {"backbone." + k: v for k, v in official_sd.items()},
            "meta": {"epoch": 12, "CLASSES": ("person",)}}
    ckpt["state_dict"]["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "maskrcnn.pth"
    torch.save(ckpt, path)
    x = torch.randn(1, 3, 96, 160)
    ref = official_overlock_forward(official_sd, x, OFFICIAL_CFGS["test_overlock"], dense=True, det=True)
    model = _load("test_overlock", str(path), features_only=True, h_proj=True)
    assert model.feature_info.channels() == [16, 24, 32 + 12, 48 + 12]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(x)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)


def test_contmix_backends_agree_in_model():
    model = _randomise(timm.create_model("test_overlock")).eval()
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, overlock_module.ContMixBlock):
            m.backend = "reference"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_model(x), rtol=1e-5, atol=1e-5)


def test_input_errors_and_pool_size():
    model = timm.create_model("test_overlock").eval()
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("test_overlock", img_size=16)
    with pytest.raises(ValueError, match="divisible"):
        timm.create_model("test_overlock", num_groups=(5, 4))
    m = timm.create_model("test_overlock", ctx_pool_size=5).eval()  # issue #39: region-centre pool size
    assert m.sub_blocks3[0].weight_proj.in_channels == 25
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_meta_gmacs_and_forms():
    assert count_macs("test_overlock") > 0
    with torch.device("meta"):
        m = timm.create_model("overlock_xt")
        t = timm.create_model("overlock_xt", deploy=False, use_aux_head=True)
    assert sum(p.numel() for p in t.parameters()) == 17_307_272  # official training form incl. aux head
    assert round(count_macs(m) / 1e9, 4) == VISIONZOO_MODELS["overlock_xt"].gmacs
    assert m.pretrained_cfg["url"].endswith("overlock_xt_in1k_224.pth")
