"""Sparsifiner: parity with the official forward on official-format checkpoints, backbone-only loading,
backends, any input size, token pruning that removes tokens, the training losses and the FLOP count."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401
from visionzoo.models.sparsifiner import SparsifinerDistillLoss
from visionzoo.utils import count_macs

from .sparsifiner_official import official_sparsifiner_deit_forward, official_sparsifiner_lvvit_forward


def _randomise(model):
    """Move norms / biases / BN statistics off their init so parity sees real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "bn" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)


def _official_file(tmp_path, model, name="sparsifiner.pth"):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": sd, "optimizer": {}, "epoch": 49}, tmp_path / name)
    return str(tmp_path / name), sd


def test_deit_small_matches_official_forward(tmp_path):
    src = timm.create_model("sparsifiner_deit_small", depth=2)
    _randomise(src)
    path, sd = _official_file(tmp_path, src)
    model = timm.create_model("sparsifiner_deit_small", depth=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = official_sparsifiner_deit_forward(sd, x)
        for backend in ("reference", "masked", "gather"):
            for block in model.blocks:
                block.attn.attn_backend = backend
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4, msg=backend)


def test_lvvit_small_matches_official_forward(tmp_path):
    src = timm.create_model("sparsifiner_lvvit_small", depth=2)
    _randomise(src)
    path, sd = _official_file(tmp_path, src)
    model = timm.create_model("sparsifiner_lvvit_small", depth=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_sparsifiner_lvvit_forward(sd, x), rtol=1e-4, atol=1e-4)


def test_backbone_only_checkpoint_keeps_fresh_predictors(tmp_path, caplog):
    src = timm.create_model("sparsifiner_deit_small", depth=2)
    backbone = {k: v for k, v in src.state_dict().items() if "mask_predictor" not in k}  # a DeiT-S layout
    torch.save({"model": backbone}, tmp_path / "deit.pth")
    with caplog.at_level("INFO"):
        model = timm.create_model("sparsifiner_deit_small", depth=2, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.pth")))
    assert "fresh init" in caplog.text
    for k, v in backbone.items():
        assert torch.equal(model.state_dict()[k], v)
    torch.save({"model": {**backbone, "extra.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="unexpected keys"):
        timm.create_model("sparsifiner_deit_small", depth=2, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "bad.pth")))


def test_any_input_size_resamples_predictors():
    model = timm.create_model("test_sparsifiner", dynamic_img_size=True).eval()
    with torch.no_grad():
        for size in ((64, 64), (96, 48), (128, 128)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 1000)
        ref = model(torch.randn(1, 3, 96, 48))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 60, 64))
    fixed = timm.create_model("test_sparsifiner")
    with pytest.raises(ValueError, match="built for 64x64"):
        fixed(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fixed(torch.randn(3, 64, 64))
    # set_input_size resamples the stored parameters exactly as the on-the-fly path does
    x = torch.randn(1, 3, 96, 48)
    with torch.no_grad():
        dyn = model(x)
        model.set_input_size((96, 48))
        assert model.blocks[0].attn.mask_predictor.proj_n.shape[0] == 6 * 3 + 1
        torch.testing.assert_close(model(x), dyn)
    del ref


def test_checkpoint_at_other_resolution_is_resampled(tmp_path):
    src = timm.create_model("test_sparsifiner")  # 4x4 grid, K = 17 // 4 = 4
    path, _ = _official_file(tmp_path, src)
    model = timm.create_model("test_sparsifiner", img_size=(48, 80), pretrained=True,  # 3x5 grid, K = 16 // 4 = 4
                              pretrained_cfg_overlay=dict(file=path))
    assert model.pos_embed.shape[1] == 16 and model.blocks[0].attn.mask_predictor.proj_back_n.shape == (16, 4)
    with pytest.raises(ValueError, match="set_input_size"):  # 8x8 grid: K would be 16
        timm.create_model("test_sparsifiner", img_size=128, pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_token_pruning_removes_tokens_and_matches_budget():
    with torch.device("meta"):  # shapes only: 196 -> 138 -> 97 -> 68 patch tokens, the official budgets
        model = timm.create_model("sparsifiner_deit_small", token_keep_rate=0.7, token_pruning_loc=(3, 6, 9)).eval()
        with torch.no_grad():
            out = model.forward_distill(torch.empty(1, 3, 224, 224))
    assert out["tokens"].shape[1] == out["token_index"].shape[1] == 68
    assert [math.ceil(0.7 ** j * 196) for j in (1, 2, 3)] == [138, 97, 68]


def test_token_pruning_intermediates_are_zero_where_pruned():
    model = timm.create_model("test_sparsifiner").eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.randn(2, 3, 64, 64))
    assert final.shape[1] == 1 + math.ceil(0.7 * 16)
    zero_cells = (inter[-1].abs().sum(1) == 0).flatten(1).sum(1)
    assert (zero_cells == 16 - math.ceil(0.7 * 16)).all()
    assert (inter[0].abs().sum(1) != 0).all()


def test_distill_loss_phases():
    model = timm.create_model("test_sparsifiner", num_classes=10, attn_self_distill_weight=0.0)
    teacher = timm.create_model("test_sparsifiner", num_classes=10, token_pruning_loc=()).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    recon = SparsifinerDistillLoss("attn_recon")
    loss, parts = recon(model, x, y)
    loss.backward()
    assert set(parts) == {"attn_recon"}
    assert model.blocks[0].attn.mask_predictor.proj_back_n.grad is not None
    model.zero_grad(set_to_none=True)
    loss, parts = SparsifinerDistillLoss("cls_distill", teacher=teacher)(model, x, y)
    loss.backward()
    assert set(parts) == {"cls", "cls_distill"}  # student pruned tokens, teacher did not
    assert model.blocks[0].attn.mask_predictor.proj_back_n.grad is None  # the mask is detached
    assert model.head.weight.grad is not None
    with pytest.raises(ValueError, match="dense teacher"):
        SparsifinerDistillLoss("cls_distill")


def test_flops_attention_reduction_and_backends():
    """Attention-map MACs (q k^T and p v) of the sparse op vs the dense reference, counted by the counter."""
    sparse = count_macs("sparsifiner_deit_small")
    dense_masked = count_macs("sparsifiner_deit_small", attn_backend="reference")
    deit = count_macs("deit_small_patch16_224")
    per_layer_dense = 2 * 6 * 197 * 197 * 64  # q k^T + p v, MACs
    per_layer_sparse = 2 * 6 * (197 + 196 * 50) * 64
    assert dense_masked - sparse == 12 * (per_layer_dense - per_layer_sparse)
    assert 1 - per_layer_sparse / per_layer_dense > 0.48
    assert abs(deit / 1e9 - 4.60) < 0.01


@pytest.mark.parametrize("pruned", [False, True])
def test_kept_coefficient_predictor_matches_official_scores_and_keys(pruned):
    """The fast predictor (embedding_bag over the 8 kept coefficients) gives the official dense
    ``coef @ basis`` scores (bitwise on the machines tested; asserted to 1e-6) and the same kept keys,
    also with per-sample token rows after pruning."""
    from visionzoo.models.sparsifiner import MaskPredictor

    torch.manual_seed(0)
    mp = MaskPredictor(head_dim=16, num_heads=3, grid_size=(7, 9), reduce_n_factor=4)  # N = 64, K = 16
    with torch.no_grad():
        for p in mp.parameters():
            p.normal_(0, 0.3)
    B, N = 3, 64
    token_index = None
    if pruned:  # 40 of the 63 patch tokens remain, in order
        token_index = torch.stack([torch.randperm(63)[:40].sort().values for _ in range(B)])
        N = 41
    q, k = torch.randn(B, 3, N, 16), torch.randn(B, 3, N, 16)
    with torch.no_grad():
        official = mp.approx_attention(q, k, (7, 9), token_index)
        fast = mp.approx_attention_kept_coef(q, k, (7, 9), token_index)
        torch.testing.assert_close(fast, official, rtol=0, atol=1e-6)
        idx_fast, _ = mp(q, k, (7, 9), token_index, official=False)
        idx_official, _ = mp(q, k, (7, 9), token_index, official=True)
    assert torch.equal(idx_fast.sort(-1).values, idx_official.sort(-1).values)


def test_deit_small_at_384_matches_official_forward(tmp_path):
    """577 tokens (K = 96 basis vectors, 145 kept keys), the size of the CPU speed bar: the fast CPU path
    (kept-coefficient predictor + masked SDPA) gives the official logits."""
    src = timm.create_model("sparsifiner_deit_small", depth=1, img_size=384)
    _randomise(src)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    model = src.eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ref = official_sparsifiner_deit_forward(sd, x)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_cpu_key_selection_kernel(monkeypatch):
    """The C kernel's kept keys equal topk's on random scores (also with a per-sample table), keep the
    lowest indices on ties, and the model falls back to embedding_bag + topk without it."""
    from visionzoo.models import sparsifiner as sparsifiner_module
    from visionzoo.models.sparsifiner import MaskPredictor
    from visionzoo.ops import is_available
    from visionzoo.ops.sparse_attention import sparsifiner_keys

    if not is_available("sparse_keys", "cpu", "cpu"):
        pytest.skip("no C compiler: the kernel is unavailable (the fallback is covered by the other tests)")
    g = torch.Generator().manual_seed(0)
    table = torch.rand(2 * 16, 53, generator=g)  # two samples' tables of 16 basis rows, 53 keys
    cols = torch.rand(2, 3, 52, 16, generator=g).argsort(-1)[..., :5].sort(-1).values
    cols = cols + torch.tensor([0, 16]).view(2, 1, 1, 1)
    weights = torch.rand(2, 3, 52, 5, generator=g)
    idx = sparsifiner_keys(cols, weights, table, 14, backend="cpu")
    scores = F.embedding_bag(cols.reshape(-1, 5), table, per_sample_weights=weights.reshape(-1, 5), mode="sum")
    ref = scores.view(2, 3, 52, 53).topk(14, dim=-1).indices.sort(-1).values
    assert torch.equal(idx, ref)
    ties = sparsifiner_keys(cols, weights, torch.zeros_like(table), 14, backend="cpu")  # every score 0
    assert torch.equal(ties, torch.arange(14).expand(2, 3, 52, 14))
    monkeypatch.setattr(sparsifiner_module, "CPU_KERNEL_MIN_TOKENS", 0)  # the kernel for 17 tokens too
    mp = MaskPredictor(head_dim=8, num_heads=2, grid_size=(4, 4))
    q, k = torch.randn(1, 2, 17, 8), torch.randn(1, 2, 17, 8)
    with torch.no_grad():
        for p in mp.parameters():  # (zero-initialised: every score would tie)
            p.normal_(0, 0.3)
        fast, _ = mp(q, k, (4, 4), official=False)
        mp.cpu_kernel = False
        fallback, _ = mp(q, k, (4, 4), official=False)
    assert torch.equal(fast.sort(-1).values, fallback.sort(-1).values)
