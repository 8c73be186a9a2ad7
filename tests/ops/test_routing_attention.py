"""Tests for visionzoo.ops.routing_attention (reference / chunked backends, custom-op plumbing; the Triton
backend is tested in test_routing_attention_triton.py)."""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.routing_attention import BACKENDS, bi_level_routing_attention, routing_attention_flops
from visionzoo.ops.routing_attention import _chunked, _op

ENV = "VISIONZOO_BACKEND_ROUTING_ATTENTION"
# (B, H, W, C_qk, C_v, heads, n_win, topk): square and non-square grids / regions, topk 1..all.
SHAPES = [
    (2, 8, 12, 16, 16, 2, (2, 3), 2),
    (1, 6, 6, 8, 8, 1, 3, 9),
    (2, 16, 16, 32, 32, 4, 4, 4),
    (1, 10, 6, 12, 24, 3, (5, 2), 3),  # C_v != C_qk
]


def _inputs(B, H, W, c_qk, c_v, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, c, generator=g, dtype=dtype) for c in (c_qk, c_qk, c_v)]


def _run(inputs, backend, heads, n_win, topk, grads=True):
    leaves = [x.clone().requires_grad_(grads) for x in inputs]
    scale = inputs[0].shape[-1] ** -0.5
    out, idx = bi_level_routing_attention(*leaves, heads, n_win, topk, scale, return_routing=True, backend=backend)
    if not grads:
        return out, idx, None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    return out, idx, [x.grad for x in leaves]


def naive_bra(q, k, v, heads, n_win, topk, scale):
    """Independent float64 definition: per query token, softmax over the tokens of its routed regions."""
    B, H, W, C = q.shape
    n_h, n_w = (n_win, n_win) if isinstance(n_win, int) else n_win
    rh, rw = H // n_h, W // n_w
    region = (torch.arange(H)[:, None] // rh * n_w + torch.arange(W)[None, :] // rw).reshape(-1)  # token -> region
    qf, kf, vf = (x.reshape(B, H * W, -1).double() for x in (q, k, v))
    S2 = n_h * n_w
    q_r = torch.stack([qf[:, region == r].mean(1) for r in range(S2)], 1)
    k_r = torch.stack([kf[:, region == r].mean(1) for r in range(S2)], 1)
    idx = torch.topk((q_r * scale) @ k_r.transpose(1, 2), topk, dim=-1).indices  # (B, S2, topk)
    out = torch.zeros(B, H * W, v.shape[-1], dtype=torch.float64)
    dq, dv = C // heads, v.shape[-1] // heads
    for b in range(B):
        for t in range(H * W):
            keys = torch.isin(region, idx[b, region[t]])
            for h in range(heads):
                s = (qf[b, t, h * dq:(h + 1) * dq] * scale) @ kf[b, keys, h * dq:(h + 1) * dq].T
                out[b, t, h * dv:(h + 1) * dv] = s.softmax(-1) @ vf[b, keys, h * dv:(h + 1) * dv]
    return out.reshape(B, H, W, -1), idx


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:])
def test_reference_matches_naive_definition(shape):
    B, H, W, c_qk, c_v, heads, n_win, topk = shape
    q, k, v = _inputs(B, H, W, c_qk, c_v)
    out, idx, _ = _run((q, k, v), "reference", heads, n_win, topk, grads=False)
    ref, ref_idx = naive_bra(q, k, v, heads, n_win, topk, c_qk ** -0.5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# The chunked backend's two strategies: gather per chunk of region rows (one chunk; one region row per
# chunk) and dense attention with the routing as a token mask (small grids).
MODES = {"gather-one-chunk": (1 << 22, 0), "gather-row-chunks": (1, 0), "dense-mask": (1 << 22, 10 ** 6)}


def _set_mode(monkeypatch, mode):
    chunk_elements, dense_ratio = MODES[mode]
    monkeypatch.setattr(_chunked, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(_chunked, "DENSE_MAX_RATIO", dense_ratio)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_reference_outputs_and_grads(shape, mode, monkeypatch):
    _set_mode(monkeypatch, mode)
    B, H, W, c_qk, c_v, heads, n_win, topk = shape
    inputs = _inputs(B, H, W, c_qk, c_v)
    out, idx, grads = _run(inputs, "chunked", heads, n_win, topk)
    ref, ref_idx, ref_grads = _run(inputs, "reference", heads, n_win, topk)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_chunked_float32_and_chunk_count(monkeypatch):
    B, H, W, C, heads, n, topk = 2, 16, 16, 32, 4, 4, 4
    inputs = _inputs(B, H, W, C, C, dtype=torch.float32)
    ref = _run(inputs, "reference", heads, n, topk)
    # BiFormer's stage 3: dense at 224 / 448 (n_win 7), gather at 600x500 with n_win 8.
    assert _chunked.use_dense(14, 14, 16, 4) and _chunked.use_dense(28, 28, 16, 16)
    assert not _chunked.use_dense(40, 32, 16, 20)
    monkeypatch.setattr(_chunked, "DENSE_MAX_RATIO", 0)
    monkeypatch.setattr(_chunked, "CHUNK_ELEMENTS", 2 * (B * n * topk * 16 * 2 * C))  # two region rows per chunk
    assert _chunked._chunk_rows(B, n, n, topk, 16, C, C) == 2
    out = _run(inputs, "chunked", heads, n, topk)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(out[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["gather-row-chunks", "dense-mask"])
@pytest.mark.parametrize("layout", ["qkv_slices", "transposed"])
def test_chunked_strided_inputs(layout, mode, monkeypatch):
    """The model passes channel slices of one qkv projection (read in place through strided views);
    other layouts are copied first. Both agree with the reference, gradients included."""
    _set_mode(monkeypatch, mode)
    B, H, W, C, heads, n, topk = 2, 8, 12, 16, 2, (2, 3), 3
    g = torch.Generator().manual_seed(3)
    if layout == "qkv_slices":
        base = torch.randn(B, H, W, 3 * C, generator=g, dtype=torch.float64)
        make = lambda t: t.split(C, dim=-1)  # noqa: E731
    else:
        base = torch.randn(B, W, H, 3 * C, generator=g, dtype=torch.float64)
        make = lambda t: t.transpose(1, 2).split(C, dim=-1)  # noqa: E731
    res = {}
    for backend in ("chunked", "reference"):
        leaf = base.clone().requires_grad_(True)
        q, k, v = make(leaf)
        out = bi_level_routing_attention(q, k, v, heads, n, topk, C ** -0.5, backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * w).sum().backward()
        res[backend] = (out, leaf.grad)
    for a, b in zip(res["chunked"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["gather-row-chunks", "dense-mask"])
def test_routing_is_not_differentiated(mode, monkeypatch):
    """Gradients flow through the token attention only: they equal those of attention with frozen routing."""
    _set_mode(monkeypatch, mode)
    q, k, v = _inputs(1, 8, 8, 8, 8)
    _, idx, grads = _run((q, k, v), "chunked", 2, 2, 2)
    # With the routing fixed, the same attention written as a masked dense softmax.
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    region = (torch.arange(8)[:, None] // 4 * 2 + torch.arange(8)[None, :] // 4).reshape(-1)
    allowed = torch.stack([torch.isin(region, idx[0, region[t]]) for t in range(64)])  # (64, 64)
    qf, kf, vf = (x.reshape(64, 2, 4).transpose(0, 1) for x in leaves)
    s = (qf * 8 ** -0.5) @ kf.transpose(1, 2)
    out = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vf).transpose(0, 1).reshape(1, 8, 8, 8)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * w).sum().backward()
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-10, atol=1e-10)


def test_only_requested_grads_and_autograd_gradcheck():
    q, k, v = _inputs(1, 4, 4, 4, 4)
    q.requires_grad_(True)
    out = bi_level_routing_attention(q, k, v, 1, 2, 2, 0.5, backend="chunked")
    (g,) = torch.autograd.grad(out.sum(), [q])
    assert g.shape == q.shape
    small = [x.requires_grad_(True) for x in _inputs(1, 2, 4, 2, 2)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: bi_level_routing_attention(a, b, c, 1, (1, 2), 1, 0.5, backend="chunked"), small)


def test_meta_device_flops_and_counter():
    B, H, W, C, heads, n, topk = 2, 28, 28, 128, 4, 7, 4
    q, k, v = (torch.empty(B, H, W, C, device="meta") for _ in range(3))
    counter = FlopCounterMode(display=False)
    with counter:
        out = bi_level_routing_attention(q, k, v, heads, n, topk, C ** -0.5)
    assert out.shape == (B, H, W, C) and out.device.type == "meta"
    expected = routing_attention_flops(B, n, 16, topk, C, C)
    assert counter.get_total_flops() == expected
    assert expected == 2 * B * (49 * 49 * C + 49 * 16 * 4 * 16 * 2 * C)


def test_validation_errors():
    q, k, v = _inputs(1, 6, 6, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot be cut into 4x4"):
        bi_level_routing_attention(q, k, v, 2, 4, 1, 0.5)
    with pytest.raises(ValueError, match=r"topk=10 must be in \[1, 9\]"):
        bi_level_routing_attention(q, k, v, 2, 3, 10, 0.5)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        bi_level_routing_attention(q, k, v, 3, 3, 1, 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        bi_level_routing_attention(q, k, v, 2, 3, 1, 0.5, backend="flash")
    with pytest.raises(ValueError, match="4-d"):
        bi_level_routing_attention(q[0], k, v, 2, 3, 1, 0.5)


def test_auto_backend_and_env_override(monkeypatch):
    q, k, v = _inputs(1, 4, 4, 4, 4, dtype=torch.float32)
    monkeypatch.delenv(ENV, raising=False)
    assert _op.resolve("auto", q) == "chunked"  # CPU: never Triton's interpreter
    monkeypatch.setenv(ENV, "reference")
    assert _op.resolve("auto", q) == "reference"
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=ENV):
        bi_level_routing_attention(q, k, v, 1, 2, 2, 0.5)
    monkeypatch.delenv(ENV)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        bi_level_routing_attention(q, k, v, 1, 2, 2, 0.5, backend="flash")
    assert set(BACKENDS) == {"reference", "chunked", "flex", "triton"}


def test_auto_prefers_triton_on_cuda(monkeypatch):
    """On CUDA ``auto`` picks FlexAttention when it is there, else the Triton kernel when Triton imports
    (float32/16/bf16), ``chunked`` for float64 or without Triton; an explicit ``triton`` with float64 is
    an error naming the dtype."""
    monkeypatch.delenv(ENV, raising=False)

    def cuda(dtype=torch.float32):  # selection reads only the device and the dtype
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)

    monkeypatch.setattr(_op._triton, "is_available", lambda device_type: True)
    monkeypatch.setattr(_op._flex, "unavailable_reason", lambda device_type: None)
    assert _op.resolve("auto", cuda()) == "flex"  # the maintained kernel leads
    monkeypatch.setattr(_op._flex, "unavailable_reason", lambda device_type: "no FlexAttention")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _op.resolve("auto", cuda(dtype)) == "triton"
    assert _op.resolve("auto", cuda(torch.float64)) == "chunked"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: does not support dtype torch.float64"):
        _op.resolve("triton", cuda(torch.float64))
    monkeypatch.undo()
    monkeypatch.setattr(_op._triton, "is_available", lambda device_type: False)
    monkeypatch.setattr(_op._flex, "unavailable_reason", lambda device_type: "no FlexAttention")
    assert not _op.is_available("triton", "cuda")
    assert _op.resolve("auto", cuda()) == "chunked"


def test_opcheck_custom_op():
    q, k, v = (torch.randn(1, 4, 4, 8) for _ in range(3))
    for backend in ("reference", "chunked"):
        torch.library.opcheck(torch.ops.visionzoo.bi_level_routing_attention, (q, k, v, 2, 2, 2, 2, 0.35, backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_chunked_memory_stays_within_its_chunk_budget(monkeypatch):
    """Forward on channel slices of one qkv tensor (the model's layout): besides its output, ``chunked``
    holds only chunk-sized temporaries (no region-major copy of Q/K/V, no topk-fold K/V); the reference
    holds the topk-fold gathered K/V. (The backends are called directly: a dispatch mode does not see
    inside a custom op.)"""
    from visionzoo.ops.routing_attention._common import route
    from visionzoo.utils.memory import PeakLiveBytes

    B, H, W, C, heads, n, topk = 2, 32, 32, 16, 2, 8, 2
    monkeypatch.setattr(_chunked, "DENSE_MAX_RATIO", 0)
    monkeypatch.setattr(_chunked, "CHUNK_ELEMENTS", B * n * topk * 16 * 2 * C)  # one region row per chunk
    base = torch.randn(B, H, W, 3 * C)
    idx = route(*base.split(C, dim=-1)[:2], n, n, topk, C ** -0.5)
    kv_bytes = 2 * B * H * W * C * 4
    peaks = {}
    for name, fn in (("chunked", _chunked.bra_chunked), ("reference", _op._reference_spatial)):
        # The input is made inside the tracked region (views of an outside tensor would count as new
        # storage) and subtracted.
        with torch.no_grad(), PeakLiveBytes() as tracker:
            q, k, v = base.clone().split(C, dim=-1)
            fn(q, k, v, idx, heads, n, n, C ** -0.5)
        peaks[name] = tracker.peak - base.numel() * 4
    lean, ref = peaks["chunked"], peaks["reference"]
    out_bytes = kv_bytes // 2
    chunk_gather = kv_bytes * topk // n  # K/V of one region row's routed regions
    # Output + the chunk's gathered K/V (1/4 of K/V here), its per-head copies and the chunk's query /
    # output pieces: less than the region-major copies of Q, K and V alone (1.5x K/V) would take.
    assert lean <= out_bytes + 4 * chunk_gather, (lean, kv_bytes)
    assert lean < out_bytes + kv_bytes
    assert ref >= topk * kv_bytes
