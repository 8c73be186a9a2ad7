"""DependencyViT: semantics against an independent forward written from the paper, parameter and MAC
counts, Lite's token pruning, backends, intermediates, dependency maps, loading and input errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.models.dependencyvit import TokenPruner, checkpoint_filter_fn
from visionzoo.utils import count_macs, count_params


def _randomise(model, seed=0):
    """LayerScale 1e-6 would hide the attention; give every parameter a visible random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def manual_forward(model, x):
    """DependencyViT written out from the paper's equations with plain tensor ops (no visionzoo op)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = x.double()
    D = model.embed_dim
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    B = x.shape[0]
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    m = torch.ones(B, x.shape[1], dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        H = block.attn.num_heads
        N = x.shape[1]
        h = F.layer_norm(x, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], eps=1e-6)
        q, k, v = (h @ sd[pre + "attn.qkv.weight"].T).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        forward_attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)  # (B, H, child, parent)
        p = torch.softmax(h @ sd[pre + "attn.head_selector.weight"].T / 0.1, dim=-1)  # (B, N, H)
        hidden = F.gelu(h @ sd[pre + "attn.message_controller.fc1.weight"].T)
        m = m * torch.sigmoid(hidden @ sd[pre + "attn.message_controller.fc2.weight"].T)[..., 0]
        sent = forward_attn * (p.transpose(1, 2) * m[:, None, :])[..., None]  # child i's share to parent j
        out = torch.einsum("bhij,bhid->bjhd", sent, v).reshape(B, N, D)
        x = x + sd[pre + "ls1.gamma"] * (out @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"])
        if block.pruner is not None:
            mass = sent.sum(dim=(1, 2))  # (B, N): what each parent receives
            n_keep = block.pruner.num_kept(N)
            keep = mass.argsort(dim=1, descending=True)[:, :n_keep].sort(dim=1).values
            x = torch.stack([x[b, keep[b]] for b in range(B)])
            m = torch.stack([m[b, keep[b]] for b in range(B)])
        h = F.layer_norm(x, (D,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        x = x + sd[pre + "ls2.gamma"] * (h @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"])
    feats = F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6) * m[..., None]
    return feats, feats.mean(dim=1) @ sd["head.weight"].T + sd["head.bias"]


@pytest.mark.parametrize("name", ["test_dependencyvit", "test_dependencyvit_lite"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_matches_manual_forward(name, backend):
    model = _randomise(timm.create_model(name, attn_backend=backend)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    ref_feats, ref_logits = manual_forward(model, x)
    torch.testing.assert_close(feats.double(), ref_feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-4, atol=1e-5)


def test_backends_agree_in_training():
    x = torch.randn(2, 3, 64, 64)
    grads = {}
    for backend in ("reference", "chunked"):
        torch.manual_seed(0)
        model = _randomise(timm.create_model("test_dependencyvit_lite", attn_backend=backend)).train()
        out = model(x)
        out.pow(2).mean().backward()
        grads[backend] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["chunked"][0], grads["reference"][0], rtol=1e-5, atol=1e-5)
    for n, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["chunked"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["dependencyvit_tiny", "dependencyvit_small", "dependencyvit_lite_tiny"])
def test_params_and_macs_match_meta(name):
    meta = VISIONZOO_MODELS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert count_params(model) == meta.params
    selector_controller = sum(p.numel() for n, p in model.named_parameters()
                              if "head_selector" in n or "message_controller" in n)
    assert selector_controller == {192: 249_984, 384: 942_336}[model.embed_dim]
    assert round(count_macs(model) / 1e9, 3) == meta.gmacs


def test_deit_head_counts_give_the_documented_param_counts():
    with torch.device("meta"):
        assert count_params(timm.create_model("dependencyvit_tiny", num_heads=3)) == 5_943_976
        assert count_params(timm.create_model("dependencyvit_small", num_heads=6)) == 22_959_976


def test_lite_removes_tokens_and_macs():
    tiny = VISIONZOO_MODELS["dependencyvit_tiny"].gmacs
    lite = VISIONZOO_MODELS["dependencyvit_lite_tiny"].gmacs
    assert lite <= 0.7 * tiny
    with torch.device("meta"):
        model = timm.create_model("dependencyvit_lite_tiny").eval()
        counts = []
        x, _ = model._embed(torch.empty(1, 3, 224, 224))
        m = idx = None
        for block in model.blocks:
            x, m, idx = block(x, m, idx)
            counts.append(x.shape[1])
        assert model.forward_features(torch.empty(1, 3, 224, 224)).shape == (1, 69, 192)
    assert counts == [196, 164, 164, 164, 132, 132, 132, 100, 100, 100, 69, 69]


def test_pruner_keeps_highest_mass_in_raster_order():
    pruner = TokenPruner(0.5)
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    m = torch.rand(2, 6)
    mass = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.7, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    xk, mk, idx = pruner(x, m, mass, None)
    assert idx.tolist() == [[1, 3, 4], [0, 1, 2]]
    torch.testing.assert_close(xk[0], x[0, [1, 3, 4]])
    torch.testing.assert_close(mk[1], m[1, [0, 1, 2]])
    _, _, idx2 = TokenPruner(2 / 3)(xk, mk, torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]]), idx)
    assert idx2.tolist() == [[3, 4], [0, 2]]  # composed back to grid positions
    assert TokenPruner(0.84).num_kept(196) == 164 and TokenPruner(0.68 / 0.84).num_kept(164) == 132


def test_message_score_option():
    model = timm.create_model("test_dependencyvit_lite", prune_score="message").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 8, 32)


def test_intermediates_on_full_grid_with_pruning():
    model = _randomise(timm.create_model("test_dependencyvit_lite")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        deps = model.forward_dependencies(x)
        emb, _ = model._embed(x)
        x1, m1, idx1 = model.blocks[0](emb)
        x2, m2, idx2 = model.blocks[1](x1, m1, idx1)
    assert [t.shape for t in inter] == [(2, 16, 32)] * 3
    torch.testing.assert_close(inter[0], x1)
    # Block 1 keeps 12 tokens: those positions hold its output, the 4 pruned ones their block-0 features.
    kept = torch.zeros(2, 16, dtype=torch.bool).scatter(1, idx2, True)
    torch.testing.assert_close(inter[1].gather(1, idx2[..., None].expand(-1, -1, 32)), x2)
    torch.testing.assert_close(inter[1][~kept], x1[~kept])
    assert final.shape == (2, 8, 32)
    # Dependency maps follow the tokens entering each block; each child sends m in total (p sums to 1).
    assert [d.shape for d in deps["dependency"]] == [(2, 16, 16), (2, 16, 16), (2, 12, 12)]
    assert deps["token_index"][2].tolist() == idx2.tolist()
    torch.testing.assert_close(deps["dependency"][1].sum(dim=1), _m_before_prune(model, x))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def _m_before_prune(model, x):
    with torch.no_grad():
        emb, _ = model._embed(x)
        x1, m1, idx1 = model.blocks[0](emb)
        _, m, _, _ = model.blocks[1].attn(model.blocks[1].norm1(x1), m1)
    return m


def test_attention_dropout_trains():
    model = timm.create_model("test_dependencyvit", attn_drop_rate=0.2).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_input_errors_and_dynamic_size():
    model = timm.create_model("test_dependencyvit").eval()
    with pytest.raises(ValueError, match="built for 64x64"):
        model(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))
    dyn = timm.create_model("test_dependencyvit_lite", dynamic_img_size=True).eval()
    with torch.no_grad():
        assert dyn(torch.randn(1, 3, 48, 96)).shape == (1, 1000)
        feats = dyn.forward_intermediates(torch.randn(1, 3, 48, 96), intermediates_only=True)
    assert feats[-1].shape == (1, 32, 3, 6)
    with pytest.raises(ValueError, match="does not fit patch 16 with stride 16"):
        dyn(torch.randn(1, 3, 50, 64))
    model.set_input_size((96, 32))
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 96, 32)).shape == (1, 12, 32)
    for bad in (dict(prune_layers=(3,)), dict(prune_layers=(0, 1), prune_ratio=0.5),
                dict(num_heads=5), dict(global_pool="token"), dict(prune_score="random", prune_layers=(1,))):
        with pytest.raises(ValueError):
            timm.create_model("test_dependencyvit", **bad)


def test_checkpoint_filter_and_pretrained_file(tmp_path):
    src = timm.create_model("test_dependencyvit", img_size=96).eval()
    wrapped = {"model": {"module." + k: v for k, v in src.state_dict().items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = timm.create_model("test_dependencyvit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pos_embed.shape == (1, 16, 32)
    torch.testing.assert_close(model.blocks[2].attn.head_selector.weight, src.blocks[2].attn.head_selector.weight)
    sd = checkpoint_filter_fn(wrapped, model)
    model.load_state_dict(sd, strict=True)
