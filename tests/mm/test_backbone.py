"""visionzoo.Backbone: registration, outputs per family, config errors, frozen_stages / norm_eval / with_cp,
init_cfg loading (official and visionzoo layouts, tensors only)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

pytestmark = pytest.mark.mm

FAMILIES = ["test_biformer", "test_overlock", "test_patnet", "test_vim", "test_dependencyvit", "test_sparsifiner"]


def _build(**cfg):
    from mmengine.registry import MODELS

    import visionzoo.mm  # noqa: F401

    return MODELS.build(dict(type="visionzoo.Backbone", **cfg))


def test_import_visionzoo_never_imports_openmmlab():
    code = ("import sys, visionzoo, timm; timm.create_model('test_vim', features_only=True); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmseg', 'mmengine', 'mmcv')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reachable_from_mmdet_and_mmseg_registries():
    import visionzoo.mm
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as DET_CONSTRUCTORS
    from mmseg.registry import MODELS as SEG_MODELS

    assert DET_MODELS.get("visionzoo.Backbone") is visionzoo.mm.VisionZooBackbone
    assert SEG_MODELS.get("visionzoo.Backbone") is visionzoo.mm.VisionZooBackbone
    assert DET_CONSTRUCTORS.get("visionzoo.LayerDecayOptimizerConstructor") is visionzoo.mm.LayerDecayOptimizerConstructor


@pytest.mark.parametrize("name", FAMILIES)
def test_tuple_of_four_pyramid_levels(name):
    backbone = _build(model_name=name)
    x = torch.randn(2, 3, 64, 96)
    outs = backbone(x)
    assert isinstance(outs, tuple) and len(outs) == 4
    for out, c, s in zip(outs, backbone.out_channels, backbone.strides):
        assert out.shape == (2, c, 64 // s, 96 // s)
    assert backbone.strides == [4, 8, 16, 32]


def test_out_norms_map_to_each_family_kwarg():
    assert _build(model_name="test_biformer", out_norms=True).timm_model.feature_norms is not None
    assert _build(model_name="test_patnet", out_norms=False).timm_model.feature_norms is None
    assert _build(model_name="test_patnet").timm_model.feature_norms is not None
    assert _build(model_name="test_overlock", out_norms=False).timm_model.feature_norms is None
    assert _build(model_name="test_overlock").timm_model.feature_norms is not None  # dense default: on
    with pytest.raises(ValueError, match="out_norms=True, but vim has no dense output norms"):
        _build(model_name="test_vim", out_norms=True)


def test_out_indices_subset_and_plain_without_pyramid():
    bb = _build(model_name="test_biformer", out_indices=(1, 3))
    outs = bb(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128] and bb.strides == [8, 32]
    raw = _build(model_name="test_vim", pyramid=False, out_indices=(0, 2))
    outs = raw(torch.randn(1, 3, 64, 64))
    assert len(outs) == 2 and all(o.shape[-2:] == (4, 4) for o in outs)
    vitdet = _build(model_name="test_vim", pyramid_channels=24)
    assert [o.shape[1] for o in vitdet(torch.randn(1, 3, 64, 64))] == [24] * 4


def _one_line_error(cfg: dict, fragment: str, exc=Exception):
    """Built the way mmdet builds a backbone (through the mmdet registry), the error is one line."""
    from mmdet.registry import MODELS

    import visionzoo.mm  # noqa: F401

    with pytest.raises(exc) as info:
        MODELS.build(dict(type="visionzoo.Backbone", **cfg))
    message = str(info.value)
    assert "\n" not in message, message
    assert fragment in message, message
    return message


def test_config_errors_are_one_line():
    _one_line_error(dict(model_name="biformer_smal"), "unknown model_name 'biformer_smal'")
    _one_line_error(dict(model_name="test_biformer", out_indices=(0, 4)),
                    "out_indices (0, 4) out of range: test_biformer has 4 feature levels (indices 0..3)")
    _one_line_error(dict(model_name="test_vim", out_indices=(7,)), "test_vim has 3 feature levels")
    _one_line_error(dict(model_name="test_patnet", frozen_stages=5), "frozen_stages=5 out of range")
    _one_line_error(dict(model_name="test_biformer", pyramid=True), "pyramid=True is for plain backbones")
    _one_line_error(dict(model_name="test_biformer", init_cfg=dict(type="Kaiming")), "init_cfg must be None or")
    _one_line_error(dict(model_name="test_biformer", model_kwargs=dict(features_only=False)),
                    "model_kwargs may not set 'features_only'")
    _one_line_error(dict(model_name="resnet18", frozen_stages=1), "frozen_stages need the model's layer groups")


def test_frozen_stages_freeze_stem_and_stages_in_forward_order():
    bb = _build(model_name="test_biformer", frozen_stages=2)
    frozen = {n for n, p in bb.timm_model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in bb.timm_model.named_parameters() if p.requires_grad}
    assert any(n.startswith("stem.") for n in frozen)
    assert any(n.startswith("stages.0.") for n in frozen) and any(n.startswith("stages.1.") for n in frozen)
    assert not any(n.startswith(("stages.2.", "stages.3.")) for n in frozen)
    assert any(n.startswith("stages.2.") for n in trainable)
    # stem only
    bb0 = _build(model_name="test_vim", frozen_stages=0)
    frozen0 = {n for n, p in bb0.timm_model.named_parameters() if not p.requires_grad}
    assert frozen0 == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} & \
        {n for n, _ in bb0.timm_model.named_parameters()}
    assert all(p.requires_grad for p in bb0.pyramid.parameters())
    # frozen modules stay in eval mode through .train(); a training step leaves their weights alone
    bb.train()
    assert not bb.timm_model.stem[1].training and bb.timm_model.stages[3].blocks[0].norm1.training
    before = {n: p.detach().clone() for n, p in bb.timm_model.named_parameters()}
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    sum(o.square().mean() for o in bb(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    for n, p in bb.timm_model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in bb.timm_model.named_parameters() if n in trainable)


def test_norm_eval_keeps_batchnorm_statistics():
    bb = _build(model_name="test_patnet", norm_eval=True)
    bns = [m for m in bb.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    bb.train()
    assert all(not m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    bb(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))
    plain = _build(model_name="test_patnet").train()
    assert all(m.training for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("name,block", [("test_biformer", "stages.1.blocks.0"), ("test_vim", "blocks.1"),
                                        ("test_overlock", "blocks2.0")])
def test_with_cp_recomputes_blocks_and_matches_gradients(name, block):
    torch.manual_seed(0)
    ref = _build(model_name=name).train()
    cp = _build(model_name=name, with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    calls = {"ref": 0, "cp": 0}
    # pre-hooks: a non-reentrant checkpoint may stop its recomputation before the block returns
    ref.timm_model.get_submodule(block).register_forward_pre_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    cp.timm_model.get_submodule(block).register_forward_pre_hook(lambda *a: calls.__setitem__("cp", calls["cp"] + 1))
    x = torch.randn(2, 3, 64, 64)
    for model in (ref, cp):
        sum(o.square().mean() for o in model(x)).backward()
    assert calls == {"ref": 1, "cp": 2}  # checkpointing re-runs the block in backward
    for (n, a), (_, b) in zip(ref.named_parameters(), cp.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


# --- init_cfg ---------------------------------------------------------------------------------
class Opaque:
    """Stands for the objects mmengine's Runner pickles into its checkpoints (message hub, buffers)."""
def _randomised(name, **kwargs):
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_init_cfg_loads_visionzoo_state_dict(name, tmp_path):
    from visionzoo.layers.dense import probe_dense

    src = _randomised(name, **({"feature_norms": True} if probe_dense(name).feature_norms else {}))
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    bb = _build(model_name=name, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    bb.init_weights()
    own = bb.timm_model.state_dict()
    src_sd = src.state_dict()
    for k, v in own.items():
        assert torch.equal(v, src_sd[k]), k


def test_init_cfg_loads_official_biformer_files(tmp_path):
    from ..models.test_biformer import _to_official

    src = _randomised("test_biformer", feature_norms=True)
    official = _to_official(src.state_dict())
    # the official classification training state (pickles argparse.Namespace: allow-listed)
    cls_path = tmp_path / "cls.pth"
    classification = {k: v for k, v in official.items() if not k.startswith("extra_norms.")}
    torch.save({"model": classification, "epoch": 3, "args": argparse.Namespace(model="biformer")}, cls_path)
    bb = _build(model_name="test_biformer", init_cfg=dict(type="Pretrained", checkpoint=str(cls_path)))
    fresh_norm = bb.timm_model.feature_norms[1].weight.detach().clone()
    bb.init_weights()
    assert torch.equal(bb.timm_model.stages[2].blocks[0].attn.qkv.weight, src.stages[2].blocks[0].attn.qkv.weight)
    assert torch.equal(bb.timm_model.feature_norms[1].weight, fresh_norm)  # a classification file has none
    # an official mmseg dense checkpoint (state_dict with backbone. keys and the extra norms)
    dense = {k: v for k, v in official.items() if not k.startswith(("head.", "norm."))}
    dense_path = tmp_path / "dense.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in dense.items()}, "meta": {"iter": 160000}}, dense_path)
    bb = _build(model_name="test_biformer", init_cfg=dict(type="Pretrained", checkpoint=str(dense_path)))
    bb.init_weights()
    assert torch.equal(bb.timm_model.feature_norms[3].weight, src.feature_norms[3].weight)


def test_checkpoint_of_another_family_is_one_line(tmp_path):
    path = tmp_path / "biformer.pth"
    torch.save({"model": timm.create_model("test_biformer").state_dict()}, path)
    bb = _build(model_name="test_overlock", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    from visionzoo.mm.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError) as info:
        bb.init_weights()
    message = str(info.value)
    assert "\n" not in message and "does not fit overlock" in message
    assert "look like a biformer checkpoint" in message


def test_file_needing_unpickling_is_refused_with_the_way_out(tmp_path):
    from visionzoo.mm import UnsafeCheckpointError

    src = timm.create_model("test_vim")
    path = tmp_path / "runner.pth"
    torch.save({"state_dict": {"backbone.body.model." + k: v for k, v in src.state_dict().items()},
                "message_hub": Opaque()}, path)
    bb = _build(model_name="test_vim", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(UnsafeCheckpointError) as info:
        bb.init_weights()
    message = str(info.value)
    assert "\n" not in message and "Opaque" in message and "extract_weights --trust" in message
    # the explicit, trusted conversion gives a tensors-only file that loads (Backbone keys included)
    clean = tmp_path / "clean.pth"
    from visionzoo.mm.extract_weights import extract

    assert extract(str(path), str(clean)) == len(src.state_dict())
    bb = _build(model_name="test_vim", init_cfg=dict(type="Pretrained", checkpoint=str(clean)))
    bb.init_weights()
    assert torch.equal(bb.timm_model.blocks[1].mixer.in_proj.weight, src.blocks[1].mixer.in_proj.weight)


def test_missing_file_and_wrong_variant_are_one_line(tmp_path):
    bb = _build(model_name="test_biformer", init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "no.pth")))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        bb.init_weights()
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_biformer", dims=(16, 32, 64, 96)).state_dict(), other)
    bb = _build(model_name="test_biformer", init_cfg=dict(type="Pretrained", checkpoint=str(other)))
    with pytest.raises(ValueError) as info:
        bb.init_weights()
    assert "\n" not in str(info.value) and "test_biformer" in str(info.value)


def test_init_cfg_official_patnet_file_matches_official_dense_forward(tmp_path):
    """An official PATNet file (bare state dict in the official layout, with the fork_feat norms)
    loaded through init_cfg gives the official dense backbone's outputs."""
    from ..models.patnet_official import official_partialnet_forward
    from ..models.test_patnet import _official_pth, _randomise

    src = _randomised("test_patnet", feature_norms=True)
    path, official_sd = _official_pth(tmp_path, _randomise(src))
    bb = _build(model_name="test_patnet", init_cfg=dict(type="Pretrained", checkpoint=path))
    bb.init_weights()
    bb.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = bb(x)
        ref = official_partialnet_forward(official_sd, x, fork_feat=True)
    for out, r in zip(outs, ref):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-4)
