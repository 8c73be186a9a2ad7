"""Vim: parity with the official forward on official-format checkpoints, loading rules,
position-embedding resizing, input-size errors and the FLOP count."""
import argparse
import math

import pytest
import timm
import torch

import visionzoo  # noqa: F401
from timm.optim import create_optimizer_v2

from visionzoo.layers import SimpleFeaturePyramid
from visionzoo.utils import count_macs

from .vim_official import official_vim_forward


def _to_official(state_dict):
    out = {}
    for k, v in state_dict.items():
        if k.startswith("blocks."):
            k = "layers." + k[len("blocks."):]
        elif k.startswith("norm."):
            k = "norm_f." + k[len("norm."):]
        out[k] = v.clone()
    return out


def _randomise_ssm(model):
    """Move A, D and the conv/dt weights off their structured init so parity tests see real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "A_b_log", "D", "D_b")) or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))


def _save_official(path, model, ema_model=None):
    sd = _to_official(model.state_dict())
    ckpt = {
        "model": sd,
        "model_ema": _to_official((ema_model or model).state_dict()),
        "optimizer": {},
        "epoch": 299,
        "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2", lr=5e-4, drop_path=0.0),
    }
    torch.save(ckpt, path)
    return sd


@pytest.fixture
def x224():
    return torch.randn(2, 3, 224, 224)


def test_vim_tiny_matches_official_forward(tmp_path, x224):
    src = timm.create_model("vim_tiny")
    _randomise_ssm(src)
    official_sd = _save_official(tmp_path / "vim_t.pth", src)
    model = timm.create_model("vim_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "vim_t.pth"))).eval()
    with torch.no_grad():
        ours = model(x224)
    ref = official_vim_forward(official_sd, x224)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_stride8_matches_official_forward(tmp_path):
    src = timm.create_model("vim_tiny_stride8", depth=2)
    _randomise_ssm(src)
    official_sd = _save_official(tmp_path / "s8.pth", src)
    assert official_sd["pos_embed"].shape == (1, 730, 192)
    model = timm.create_model("vim_tiny_stride8", depth=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "s8.pth"))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_vim_forward(official_sd, x, stride=8), rtol=1e-4, atol=1e-4)


def test_ema_tag_loads_model_ema(tmp_path):
    a, b = timm.create_model("vim_tiny", depth=1), timm.create_model("vim_tiny", depth=1)
    _save_official(tmp_path / "ckpt.pth", a, ema_model=b)
    overlay = dict(file=str(tmp_path / "ckpt.pth"))
    plain = timm.create_model("vim_tiny", depth=1, pretrained=True, pretrained_cfg_overlay=overlay)
    ema = timm.create_model("vim_tiny.in1k_ema", depth=1, pretrained=True, pretrained_cfg_overlay=overlay)
    torch.testing.assert_close(plain.pos_embed, a.pos_embed)
    torch.testing.assert_close(ema.pos_embed, b.pos_embed)


def test_missing_key_is_a_clear_error(tmp_path):
    src = timm.create_model("vim_tiny", depth=1)
    sd = _to_official(src.state_dict())
    del sd["layers.0.mixer.D_b"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match=r"missing keys \[blocks\.0\.mixer\.D_b\]"):
        timm.create_model("vim_tiny", depth=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "broken.pth")))


def test_other_num_classes_and_in_chans_with_pretrained(tmp_path):
    src = timm.create_model("vim_tiny", depth=1)
    _save_official(tmp_path / "ckpt.pth", src)
    model = timm.create_model("vim_tiny", depth=1, num_classes=10, in_chans=1, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt.pth")))
    assert model.head.weight.shape == (10, 192)
    assert model.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(model.blocks[0].mixer.A_log, src.blocks[0].mixer.A_log)
    assert model(torch.randn(1, 1, 224, 224)).shape == (1, 10)


def test_pos_embed_resize_keeps_the_middle_class_row(tmp_path):
    src = timm.create_model("vim_tiny", depth=1)
    official = _save_official(tmp_path / "ckpt.pth", src)
    model = timm.create_model("vim_tiny", depth=1, img_size=288, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt.pth")))
    pos_old, pos_new = official["pos_embed"], model.pos_embed.detach()
    assert pos_new.shape == (1, 18 * 18 + 1, 192)
    # The class row moves from index 14*14//2 = 98 to 18*18//2 = 162, unchanged.
    torch.testing.assert_close(pos_new[:, 162], pos_old[:, 98])
    # The grid rows are the plain resample of the 14x14 grid without the class row.
    grid_old = torch.cat([pos_old[:, :98], pos_old[:, 99:]], dim=1)
    expected = timm.layers.resample_abs_pos_embed(grid_old, (18, 18), (14, 14), num_prefix_tokens=0)
    torch.testing.assert_close(torch.cat([pos_new[:, :162], pos_new[:, 163:]], dim=1), expected)


def test_dynamic_img_size_and_set_input_size_agree():
    torch.manual_seed(1)
    model = timm.create_model("test_vim", dynamic_img_size=True).eval()
    x64, x96 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 80)
    fixed = timm.create_model("test_vim").eval()
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x64), fixed(x64))
        dynamic_out = model(x96)
        fixed.set_input_size((96, 80))
        torch.testing.assert_close(fixed(x96), dynamic_out)


def test_input_size_errors_name_the_problem():
    model = timm.create_model("test_vim").eval()
    with pytest.raises(ValueError, match=r"built for 64x64 inputs, got 80x80"):
        model(torch.randn(1, 3, 80, 80))
    dynamic = timm.create_model("test_vim", dynamic_img_size=True).eval()
    with pytest.raises(ValueError, match=r"image height 70 does not fit patch 16 with stride 16"):
        dynamic(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"images of shape \(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_backward_direction_contributes():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].mixer.dt_proj_b.bias.add_(1.0)
        after = model(x)
    assert (before - after).abs().max() > 1e-4


def _vim_macs_formula(D, depth, L, N=16, K=4, patch_tokens=None, patch=16, classes=1000):
    E, R = 2 * D, math.ceil(D / 16)
    per_dir = L * E * K + L * E * (R + 2 * N) + L * R * E + (9 * L * E * N + 2 * L * E) // 2
    per_layer = L * D * 2 * E + L * E * D + 2 * per_dir
    return depth * per_layer + patch_tokens * D * 3 * patch * patch + D * classes


def test_flops_count_the_scan():
    macs = count_macs("vim_tiny")
    assert macs == _vim_macs_formula(192, 24, 197, patch_tokens=196)
    assert 1.5e9 < macs < 1.6e9  # "about 1.5 GMACs" with the scan; 1.29 without it
    small = count_macs("vim_small")
    assert small == _vim_macs_formula(384, 24, 197, patch_tokens=196)


def test_default_features_and_simple_feature_pyramid():
    with torch.device("meta"):
        feats = timm.create_model("vim_small", features_only=True)
    assert feats.feature_info.reduction() == [16] * 4
    assert feats.feature_info.module_name() == ["blocks.5", "blocks.11", "blocks.17", "blocks.23"]

    model = timm.create_model("test_vim").eval()
    maps = model.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True, indices=3)
    sfp = SimpleFeaturePyramid(model.embed_dim).eval()
    outs = sfp(maps + maps[-1:])  # one map per level
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    proj = SimpleFeaturePyramid(model.embed_dim, out_channels=16).eval()
    assert all(o.shape[1] == 16 for o in proj(maps[-1]))


def test_no_weight_decay_reaches_the_optimizer():
    model = timm.create_model("test_vim")
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert {"pos_embed", "cls_token", "blocks.0.mixer.A_log", "blocks.2.mixer.A_b_log"} <= names
    assert "blocks.0.mixer.in_proj.weight" not in names


def test_bf16_autocast_runs_close_to_fp32():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_bf16_autocast_inference_keeps_the_fp32_blocks():
    """Under CPU autocast the blocks run as one fp32 call (faster than their bf16 projections op by op): a block
    gives bitwise its fp32 output; the patch embedding and the head run under autocast as usual."""
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model._embed(x)[0]
        ref = model.blocks[0](tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_block, out = model.blocks[0](tokens), model(x)
    assert out_block.dtype == torch.float32 and torch.equal(out_block, ref) and out.dtype == torch.bfloat16


def test_bf16_autocast_in_inference_mode_casts_each_projection_weight_once():
    """Under inference_mode (where autocast keeps no cast cache) the mixer's projections reuse one cast of their
    weight per weight version, with autocast's own values: bitwise the output autocast gives under no_grad. (Blocks
    run op by op here because a hook watches their in-projections.)"""
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 64, 64)
    for block in model.blocks:
        block.mixer.in_proj.register_forward_hook(lambda *a: None)
    proj = model.blocks[0].mixer.in_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            ref = model(x)
        with torch.inference_mode():
            out = model(x)
            first = proj.__dict__["_vz_cast"][1]
            assert torch.equal(model(x), out) and proj.__dict__["_vz_cast"][1] is first  # reused
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    with torch.no_grad():
        proj.weight.mul_(2.0)  # an in-place change (as load_state_dict makes) invalidates the cast
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        model(x)
    assert torch.equal(proj.__dict__["_vz_cast"][1], (proj.weight * 1).to(torch.bfloat16))


def test_cpu_inference_path_matches_the_differentiable_one(monkeypatch):
    """Under no_grad on CPU all blocks run as one C call (vim_blocks_cpu); a block whose modules carry hooks runs
    op by op (its mixer through bimamba_inner_cpu), the others one call each. Every way gives bitwise the same
    result, and the autograd path's within 1e-5."""
    from visionzoo.ops import is_available
    from visionzoo.ops.selective_scan import bimamba_inner_cpu, vim_blocks_cpu

    if not is_available("selective_scan", "cpu", "cpu"):
        pytest.skip("no C compiler for the cpu kernels")
    model = timm.create_model("vim_tiny", depth=3, img_size=(96, 128)).eval()
    _randomise_ssm(model)
    x = torch.randn(2, 3, 96, 128)
    expected = model.forward_features(x)  # autograd on: the custom ops
    mixers, stacks = [], []
    monkeypatch.setattr("visionzoo.ops.selective_scan.bimamba_inner_cpu",
                        lambda *a: mixers.append(1) or bimamba_inner_cpu(*a))
    monkeypatch.setattr("visionzoo.models.vim.vim_blocks_cpu",
                        lambda x, layers, owner: stacks.append(len(layers)) or vim_blocks_cpu(x, layers, owner))
    with torch.no_grad():
        out = model.forward_features(x)
    assert stacks == [3] and not mixers
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    seen = []
    model.blocks[1].mixer.in_proj.register_forward_hook(lambda *a: seen.append(1))
    stacks.clear()
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), out)
    assert stacks == [1, 1] and len(mixers) == 1 and seen == [1]


def test_cpu_training_path_matches_the_ops(monkeypatch):
    """With autograd on, each CPU mixer trains as one autograd node over the C kernels (bimamba_train_cpu); the
    model's output and every parameter's gradient match the op-by-op custom ops within fp32 rounding."""
    from visionzoo.ops import is_available
    from visionzoo.ops import selective_scan as ss

    if not is_available("selective_scan", "cpu", "cpu"):
        pytest.skip("no C compiler for the cpu kernels")
    model = timm.create_model("vim_tiny", depth=2, img_size=(64, 96), num_classes=10).train()
    _randomise_ssm(model)
    x, target = torch.randn(3, 3, 64, 96), torch.tensor([1, 4, 7])
    calls = []
    real = ss.bimamba_train_cpu
    monkeypatch.setattr(ss, "bimamba_train_cpu", lambda *a: calls.append(1) or real(*a))

    def step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step()
    assert calls == [1, 1]
    monkeypatch.setattr(ss, "bimamba_train_cpu_applies", lambda x, backend="auto": False)
    loss_ops, grads_ops = step()
    assert calls == [1, 1]
    torch.testing.assert_close(loss, loss_ops, rtol=1e-5, atol=1e-6)
    for name, g in grads_ops.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=name)


def test_one_call_blocks_keep_copies_and_hooks_working():
    """After an inference forward (the blocks' arguments cached for the one-call path) the model still deep-copies
    and pickles, and a global forward hook sees every module called (the one-call paths step aside)."""
    import copy
    import pickle

    model = timm.create_model("vim_tiny", depth=2, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    clone = copy.deepcopy(model)
    pickle.dumps(model)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            assert torch.equal(model(x), out) and torch.equal(clone(x), out)
    finally:
        handle.remove()
    assert seen.count("VimBlock") == 4 and seen.count("RMSNorm") == 6 and seen.count("Linear") >= 8
