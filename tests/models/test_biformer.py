"""BiFormer: parity with the official forward on official-format checkpoints (classification and dense),
key mapping, input sizes / n_win / auto_pad, dense features and the metadata."""
import argparse

import pytest
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.models.biformer import BiFormer, checkpoint_filter_fn
from visionzoo.ops.routing_attention import routing_attention_flops
from visionzoo.utils import count_macs

from .randomise import randomise_standard_layer
from .biformer_official import official_biformer_forward

TEST_CFG = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), topks=(1, 2, 4, -2), head_dim=8)


def _to_official(state_dict, layout="biformer"):
    """visionzoo keys -> the official layout (inverse of checkpoint_filter_fn's renaming)."""
    fc2 = "2" if layout == "stl" else "3"
    out = {}
    for k, v in state_dict.items():
        p = k.split(".")
        if p[0] == "stem":
            p = ["downsample_layers", "0"] + p[1:]
        elif p[0] == "stages" and p[2] == "downsample":
            p = ["downsample_layers", p[1]] + p[3:]
        elif p[0] == "stages":
            rest = p[4:]
            if rest[:2] == ["attn", "qkv"] and "stages.3." not in k:
                rest = ["attn", "qkv", "qkv"] + rest[2:]
            elif rest[:2] == ["attn", "proj"] and "stages.3." not in k:
                rest = ["attn", "wo"] + rest[2:]
            elif rest[:2] == ["mlp", "fc1"]:
                rest = ["mlp", "0"] + rest[2:]
            elif rest[:2] == ["mlp", "fc2"]:
                rest = ["mlp", fc2] + rest[2:]
            blocks = ["stages", p[1], "blocks", p[3]] if layout == "stl" else ["stages", p[1], p[3]]
            p = blocks + rest
        elif p[0] == "feature_norms":
            p = ["extra_norms"] + p[1:]
        out[".".join(p)] = v.clone()
    return out


@torch.no_grad()
def _randomise(model, seed=1):
    """Move every weight and BN statistic off its init so parity compares real values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        randomise_standard_layer(m, g)
    return model


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_tiny_matches_official_after_loading_official_checkpoint(tmp_path, backend):
    src = _randomise(timm.create_model("biformer_tiny")).eval()
    official = _to_official(src.state_dict())
    assert len(official) == 264  # the official tiny state dict (BN num_batches_tracked included)
    path = _save(tmp_path / "biformer_tiny_in1k.pth",
                 {"model": official, "epoch": 299, "args": argparse.Namespace(model="biformer_tiny")})
    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              attn_backend=backend).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        ref = official_biformer_forward(official, x, depths=(2, 2, 8, 2), dims=(64, 128, 256, 512))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_stl_layout_matches_official():
    cfg = dict(TEST_CFG, mlp_ratio=4, layout="stl", img_size=64)
    src = _randomise(BiFormer(**cfg), seed=2).eval()
    official = _to_official(src.state_dict(), layout="stl")
    model = BiFormer(**cfg).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = official_biformer_forward(official, x, TEST_CFG["depths"], TEST_CFG["dims"], TEST_CFG["topks"],
                                        n_win=2, head_dim=8, layout="stl")
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_dense_checkpoint_features_with_auto_pad(tmp_path):
    """An mmseg-style file (``backbone.`` prefix, ``extra_norms``, decode head) into features_only, on an
    input whose stage grids need padding (official dense backbone: n_win fixed, auto_pad)."""
    src = _randomise(BiFormer(**TEST_CFG, feature_norms=True, n_win=2), seed=3).eval()
    official = {k: v for k, v in _to_official(src.state_dict()).items() if not k.startswith(("head.", "norm."))}
    ckpt = {"state_dict": {**{"backbone." + k: v for k, v in official.items()},
                           "decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)}, "meta": {"iter": 80000}}
    path = _save(tmp_path / "upernet_biformer.pth", ckpt)
    model = timm.create_model("test_biformer", features_only=True, n_win=2, auto_pad=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == list(TEST_CFG["dims"])
    x = torch.randn(1, 3, 72, 88)  # stage grids 18x22, 9x11, 5x6: padded to multiples of 2
    with torch.no_grad():
        feats = model(x)
        ref = official_biformer_forward(official, x, TEST_CFG["depths"], TEST_CFG["dims"], TEST_CFG["topks"],
                                        n_win=2, head_dim=8, auto_pad=True, dense=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(18, 22), (9, 11), (5, 6), (3, 3)]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4)


def test_classification_checkpoint_into_dense_model_keeps_fresh_extra_norms():
    src = BiFormer(**TEST_CFG)
    official = _to_official(src.state_dict())
    model = BiFormer(**TEST_CFG, feature_norms=True)
    sd = checkpoint_filter_fn({"model": official}, model)
    model.load_state_dict(sd)  # strict
    assert torch.equal(model.feature_norms[0].weight, torch.ones(16))


def test_input_size_errors_and_n_win():
    model = timm.create_model("test_biformer").eval()
    with pytest.raises(ValueError, match="does not split into 2x2 routing regions"):
        model(torch.randn(1, 3, 72, 72))  # stage-2 grid 9x9
    padded = timm.create_model("test_biformer", auto_pad=True).eval()
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 72, 72)).shape == (1, 1000)
    # n_win follows img_size (one region per stage-4 token), also for non-square sizes.
    assert timm.create_model("test_biformer", img_size=(96, 160)).n_win == (3, 5)
    with torch.device("meta"):
        assert timm.create_model("biformer_tiny").n_win == (7, 7)
        assert timm.create_model("biformer_tiny", img_size=448).n_win == (14, 14)
        assert timm.create_model("biformer_tiny", n_win=8, auto_pad=True).n_win == (8, 8)
    # Fewer regions than top-k (32x32: one region): every region attends to all of them.
    with torch.no_grad():
        assert torch.isfinite(timm.create_model("test_biformer", img_size=32).eval()(torch.randn(1, 3, 32, 32))).all()
    with pytest.raises(ValueError, match="topk must be"):
        BiFormer(**dict(TEST_CFG, topks=(1, 2, 0, -2)))


def test_training_step_runs_with_every_cpu_backend():
    for backend in ("reference", "chunked"):
        model = timm.create_model("test_biformer", num_classes=5, attn_backend=backend).train()
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_triton_backend_in_the_model_matches_chunked():
    """A training step of test_biformer with the Triton BRA kernel (CPU: Triton's interpreter, ~10 s) on
    the model's strided q/k/v slices: logits and every parameter gradient equal the chunked backend's."""
    from visionzoo.ops import is_available

    if not is_available("routing_attention", "triton", "cpu"):
        pytest.skip("needs Triton with TRITON_INTERPRET=1 set before Triton is imported")
    x = torch.randn(1, 3, 64, 64)
    res = {}
    for backend in ("chunked", "triton"):
        torch.manual_seed(0)
        model = timm.create_model("test_biformer", num_classes=5, attn_backend=backend).train()
        out = model(x)
        out.sum().backward()
        res[backend] = (out, [p.grad for p in model.parameters()])
    torch.testing.assert_close(res["triton"][0], res["chunked"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res["triton"][1], res["chunked"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_meta_gmacs_count_bra():
    # BRA enters the count through its FLOP formula: tiny at 224 without it would be lower by exactly this.
    bra = 0
    for stage, (dim, side, topk) in enumerate(zip((64, 128, 256), (56, 28, 14), (1, 4, 16))):
        calls = (2, 2, 8)[stage]
        bra += calls * routing_attention_flops(1, 7, (side // 7) ** 2, topk, dim, dim) // 2
    assert bra > 0.05e9
    for name in ("biformer_tiny", "biformer_stl"):
        meta = VISIONZOO_MODELS[name]
        assert abs(count_macs(name) / 1e9 - meta.gmacs) < 1e-3
    assert VISIONZOO_MODELS["biformer_small"].gmacs == pytest.approx(4.4636)


def test_features_only_without_feature_norms():
    """features_only prunes the final norm; rebuilding the (empty) head must not read its weight."""
    model = timm.create_model("test_biformer", features_only=True, feature_norms=False)
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused CPU path needs oneDNN")
@pytest.mark.parametrize("auto_pad", [False, True])
def test_cpu_inference_fast_path_matches_the_plain_path(monkeypatch, auto_pad):
    """Eager fp32 CPU inference without autograd takes the fused path (oneDNN linears / conv with the
    epilogues, MLP token chunks, batch chunks); with grad enabled the model runs the plain ops. Chunk
    limits shrunk so that every chunking runs on a small input; the two paths agree to 1e-4."""
    from visionzoo.models import biformer

    size = (72, 64) if auto_pad else (64, 64)
    model = BiFormer(**TEST_CFG, img_size=64, n_win=2, auto_pad=auto_pad).eval()
    x = torch.randn(3, 3, *size)
    plain = model(x)  # grad enabled: the plain path
    assert not biformer._fused_inference(x)
    monkeypatch.setattr(biformer, "MLP_CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(biformer, "BATCH_CHUNK_ELEMENTS", 1)
    calls = []
    real = biformer._in_batch_chunks
    monkeypatch.setattr(biformer, "_in_batch_chunks", lambda fn, t, n: calls.append(len(t)) or real(fn, t, n))
    with torch.no_grad():
        assert biformer._fused_inference(x)
        fast = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not biformer._fused_inference(x)
    assert calls == [3] * 5  # the stem and the four stages, each in 3 chunks of one image
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
