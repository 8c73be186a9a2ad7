"""Tests for visionzoo.ops.neighborhood_aggregation (na2d_av with NATTEN 0.17 semantics, na2d_rpb)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.neighborhood_aggregation import BACKENDS, na2d_av, na2d_av_flops, na2d_rpb
from visionzoo.ops.neighborhood_aggregation import _natten, _torch

ENV = "VISIONZOO_BACKEND_NEIGHBORHOOD_AGGREGATION"
FAST = ("torch", "dense", "taps")
# (B, G, H, W, c, K): square / non-square, window == map, odd sizes, maps beyond the dense threshold.
SHAPES = [
    (2, 3, 9, 11, 4, 5),
    (1, 2, 14, 14, 16, 13),  # OverLoCK stage 3 at 224
    (1, 2, 7, 7, 3, 7),  # window == map: every pixel sees the whole map
    (2, 1, 23, 17, 5, 3),  # taps under ``torch``
    (1, 2, 5, 12, 2, 5),
]


def naive_na2d_av(attn, value, K):
    """Independent float64 definition, one pixel at a time (NATTEN 0.17: clamped windows, no padding)."""
    B, G, H, W, c = value.shape
    out = torch.zeros(B, G, H, W, c, dtype=torch.float64)
    for i in range(H):
        si = min(max(i - K // 2, 0), H - K)
        for j in range(W):
            sj = min(max(j - K // 2, 0), W - K)
            win = value[:, :, si:si + K, sj:sj + K].double().reshape(B, G, K * K, c)
            out[:, :, i, j] = (attn[:, :, i, j].double().unsqueeze(-1) * win).sum(2)
    return out


def official_rpb(rpb, H, W, K):
    """OverLoCK's ``apply_rpb`` (NATTEN's legacy rpb indexing: repeat_interleave + a flip over all pixels)."""
    idx_h = torch.arange(K)
    idx_k = ((idx_h.unsqueeze(-1) * (2 * K - 1)) + idx_h).view(-1)
    rep_h, rep_w = torch.ones(K, dtype=torch.long), torch.ones(K, dtype=torch.long)
    rep_h[K // 2], rep_w[K // 2] = H - (K - 1), W - (K - 1)
    bias_hw = idx_h.repeat_interleave(rep_h).unsqueeze(-1) * (2 * K - 1) + idx_h.repeat_interleave(rep_w)
    bias_idx = torch.flip((bias_hw.unsqueeze(-1) + idx_k).reshape(-1, K * K), [0])
    return torch.flatten(rpb, 1, 2)[:, bias_idx].reshape(rpb.shape[0], H, W, K * K)


def _inputs(B, G, H, W, c, K, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = torch.randn(B, G, H, W, K * K, generator=g, dtype=dtype).softmax(-1)
    return attn, torch.randn(B, G, H, W, c, generator=g, dtype=dtype)


def _run(attn, value, K, backend):
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    out = na2d_av(a, v, K, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return out, a.grad, v.grad


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_matches_naive_definition(shape):
    *_, K = shape
    attn, value = _inputs(*shape)
    torch.testing.assert_close(na2d_av(attn, value, K, backend="reference"), naive_na2d_av(attn, value, K))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_backends_match_reference_fp32(shape, backend):
    *_, K = shape
    attn, value = _inputs(*shape, dtype=torch.float32)
    ref = _run(attn, value, K, "reference")
    got = _run(attn, value, K, backend)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)  # equal up to summation order


@pytest.mark.parametrize("backend", ("dense", "taps"))
def test_gradcheck(backend):
    attn, value = _inputs(1, 1, 4, 5, 2, 3, seed=3)
    attn.requires_grad_(), value.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, v: na2d_av(a, v, 3, backend=backend), (attn, value), fast_mode=True)



def test_rpb_matches_official_indexing():
    g = torch.Generator().manual_seed(0)
    for K, H, W in ((5, 14, 14), (13, 14, 20), (7, 7, 7), (5, 9, 6)):
        rpb = torch.randn(3, 2 * K - 1, 2 * K - 1, generator=g)
        torch.testing.assert_close(na2d_rpb(rpb, H, W, K), official_rpb(rpb, H, W, K), rtol=0, atol=0)


def test_rpb_is_key_minus_query_offset():
    K, H, W = 5, 8, 6
    rpb = torch.arange(2 * (2 * K - 1) ** 2, dtype=torch.float64).view(2, 2 * K - 1, 2 * K - 1)
    bias = na2d_rpb(rpb, H, W, K).view(2, H, W, K, K)
    for i, j, a, b in ((0, 0, 0, 0), (7, 5, 4, 4), (3, 2, 1, 3)):
        si, sj = min(max(i - K // 2, 0), H - K), min(max(j - K // 2, 0), W - K)
        assert bias[1, i, j, a, b] == rpb[1, si + a - i + K - 1, sj + b - j + K - 1]


def test_flops_are_counted_and_meta_works():
    B, G, H, W, c, K = 2, 4, 14, 14, 8, 13
    with torch.device("meta"):
        attn, value = torch.empty(B, G, H, W, K * K), torch.empty(B, G, H, W, c)
    counter = FlopCounterMode(display=False)
    with counter:
        out = na2d_av(attn, value, K)
    assert out.shape == value.shape and out.device.type == "meta"
    assert counter.get_total_flops() == na2d_av_flops(B, G, H, W, K, c) == 2 * B * G * H * W * K * K * c


def test_env_override_and_errors(monkeypatch):
    attn, value = _inputs(1, 1, 6, 6, 2, 5)
    monkeypatch.setenv(ENV, "taps")
    torch.testing.assert_close(na2d_av(attn, value, 5), na2d_av(attn, value, 5, backend="reference"))
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match="unknown"):
        na2d_av(attn, value, 5)
    monkeypatch.delenv(ENV)
    with pytest.raises(ValueError, match="unknown backend"):
        na2d_av(attn, value, 5, backend="cuda_magic")
    with pytest.raises(ValueError, match="smaller than"):
        na2d_av(attn[:, :, :4, :4].contiguous(), value[:, :, :4, :4].contiguous(), 5)
    with pytest.raises(ValueError, match="attn must be"):
        na2d_av(attn[..., :9], value, 5)
    with pytest.raises(ValueError, match="odd"):
        na2d_av(attn, value, 4)
    with pytest.raises(ValueError, match="rpb must be"):
        na2d_rpb(torch.zeros(1, 5, 5), 8, 8, 5)
    if not _natten.natten_available():
        with pytest.raises(RuntimeError, match="not available"):
            na2d_av(attn, value, 5, backend="natten")


def test_dense_threshold():
    assert _torch.use_dense(14, 14, 13) and _torch.use_dense(7, 7, 7) and _torch.use_dense(14, 14, 5)
    assert not _torch.use_dense(56, 56, 5) and not _torch.use_dense(28, 28, 5)


def test_opcheck():
    attn, value = _inputs(1, 2, 6, 6, 3, 5, dtype=torch.float32)
    torch.library.opcheck(torch.ops.visionzoo.na2d_av, (attn, value, 5, "dense"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(not _natten.natten_available(), reason="needs natten<0.20 with na2d_av")
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_natten_matches_reference(shape):
    *_, K = shape
    attn, value = _inputs(*shape, dtype=torch.float32)
    for r, o in zip(_run(attn, value, K, "reference"), _run(attn, value, K, "natten")):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_backends_listed():
    assert set(BACKENDS) >= {"reference", "torch", "dense", "taps", "natten"}


@pytest.mark.parametrize("backend", ("dense", "taps"))
def test_partial_grads(backend):
    attn, value = _inputs(1, 2, 8, 8, 4, 5)
    ref_a, ref_v = _run(attn, value, 5, "reference")[1:]
    v = value.clone().requires_grad_()
    w = torch.randn(value.shape, generator=torch.Generator().manual_seed(1), dtype=value.dtype)
    (na2d_av(attn, v, 5, backend=backend) * w).sum().backward()
    torch.testing.assert_close(v.grad, ref_v)
    a = attn.clone().requires_grad_()
    (na2d_av(a, value, 5, backend=backend) * w).sum().backward()
    torch.testing.assert_close(a.grad, ref_a)
