"""Tests for visionzoo.ops.sparse_attention (reference / masked / gather backends, custom-op plumbing)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.sparse_attention import keep_mask, sparse_attention, sparse_attention_flops
from visionzoo.ops.sparse_attention import _gather

ENV = "VISIONZOO_BACKEND_SPARSE_ATTENTION"
# (B, H, N, d, d_v, K, dense_rows): odd token counts, K from 1 to N, no / one / several dense rows.
SHAPES = [
    (2, 3, 17, 8, 8, 5, 1),
    (1, 2, 13, 16, 4, 13, 0),
    (2, 1, 9, 4, 8, 1, 2),
    (1, 6, 50, 16, 16, 13, 1),
]


def _inputs(B, H, N, d, d_v, K, P, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, N, d_v, generator=g, dtype=dtype)
    idx = torch.rand(B, H, N - P, N, generator=g).argsort(-1)[..., :K]  # K distinct keys per row
    return q, k, v, idx


def _run(inputs, backend, P, grads=True):
    q, k, v, idx = inputs
    leaves = [x.clone().requires_grad_(grads) for x in (q, k, v)]
    out = sparse_attention(*leaves, idx, q.shape[-1] ** -0.5, dense_rows=P, backend=backend)
    if not grads:
        return out, None
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    (out * w).sum().backward()
    return out, [x.grad for x in leaves]


def naive(q, k, v, idx, scale, P):
    """Independent definition: per query row, softmax over its kept keys only."""
    B, H, N, _ = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = torch.arange(N) if i < P else idx[b, h, i - P]
                s = (q[b, h, i] @ k[b, h, keys].T) * scale
                out[b, h, i] = s.softmax(-1) @ v[b, h, keys]
    return out


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_reference_matches_naive_definition(shape):
    *dims, P = shape
    inputs = _inputs(*dims, P)
    out, _ = _run(inputs, "reference", P, grads=False)
    torch.testing.assert_close(out, naive(*inputs, inputs[0].shape[-1] ** -0.5, P), rtol=1e-10, atol=1e-10)


def test_keep_mask_counts():
    idx = torch.rand(2, 3, 16, 17).argsort(-1)[..., :5]
    mask = keep_mask(idx, 17, 1)
    assert mask.shape == (2, 3, 17, 17)
    assert mask[:, :, 0].all() and (mask[:, :, 1:].sum(-1) == 5).all()


@pytest.mark.parametrize("backend,chunk_elements", [("masked", None), ("gather", 1 << 23), ("gather", 1 << 11)])
@pytest.mark.parametrize("shape", SHAPES)
def test_backends_match_reference_outputs_and_grads(shape, backend, chunk_elements, monkeypatch):
    """``gather`` in one chunk and in chunks of a few query rows."""
    monkeypatch.setattr(_gather, "CHUNK_ELEMENTS", chunk_elements)
    *dims, P = shape
    inputs = _inputs(*dims, P)
    out, grads = _run(inputs, backend, P)
    ref, ref_grads = _run(inputs, "reference", P)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["masked", "gather"])
def test_float32(backend):
    q32, k32, v32, idx = _inputs(2, 3, 17, 8, 8, 5, 1, dtype=torch.float32)
    out = sparse_attention(q32, k32, v32, idx, 8 ** -0.5, backend=backend)
    ref = sparse_attention(q32, k32, v32, idx, 8 ** -0.5, backend="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_env_override_and_unknown(monkeypatch):
    inputs = _inputs(*SHAPES[0])
    q, k, v, idx = inputs
    monkeypatch.setenv(ENV, "gather")
    torch.testing.assert_close(sparse_attention(q, k, v, idx, 0.3), sparse_attention(q, k, v, idx, 0.3, backend="reference"))
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=ENV):
        sparse_attention(q, k, v, idx, 0.3)
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_attention(q, k, v, idx, 0.3, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'dense'"):
        sparse_attention(q, k, v, idx, 0.3, backend="dense")


def test_bad_inputs_are_value_errors():
    q, k, v, idx = _inputs(*SHAPES[0])
    with pytest.raises(ValueError, match="4-d"):
        sparse_attention(q[0], k, v, idx, 0.3)
    with pytest.raises(ValueError, match="idx must have shape"):
        sparse_attention(q, k, v, idx[:, :, 1:], 0.3)
    with pytest.raises(ValueError, match="idx must have shape"):
        sparse_attention(q, k, v, idx, 0.3, dense_rows=2)
    with pytest.raises(ValueError, match="int64"):
        sparse_attention(q, k, v, idx.float(), 0.3)
    with pytest.raises(ValueError, match="share dtype"):
        sparse_attention(q, k, v.float(), idx, 0.3)


def test_triton_tiles_sets_and_reads_the_tile():
    from visionzoo.ops.sparse_attention import triton_tiles

    before = triton_tiles()
    try:
        assert triton_tiles(8, 32) == (8, 32, before[2])  # only the ones given change
        assert triton_tiles(num_warps=2) == (8, 32, 2)
        assert triton_tiles() == (8, 32, 2)
        with pytest.raises(ValueError, match="block_k must be a power of two, got 24"):
            triton_tiles(block_k=24)
        assert triton_tiles() == (8, 32, 2)
    finally:
        triton_tiles(*before)


def test_meta_and_flop_formula():
    B, H, N, d, K = 2, 6, 197, 64, 50
    with torch.device("meta"):
        q, k, v = (torch.empty(B, H, N, d) for _ in range(3))
        idx = torch.empty(B, H, N - 1, K, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = sparse_attention(q, k, v, idx, 0.125, backend="masked")
    assert out.shape == (B, H, N, d) and out.device.type == "meta"
    expected = 2 * B * H * (N + (N - 1) * K) * 2 * d
    assert counter.get_total_flops() == expected == sparse_attention_flops(B, H, N, K, 1, d, d)
    with FlopCounterMode(display=False) as counter:  # reference: the dense cost it executes
        sparse_attention(q, k, v, idx, 0.125, backend="reference")
    assert counter.get_total_flops() == 2 * B * H * N * N * 2 * d


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["masked", "gather"])
def test_cuda_matches_reference(backend):
    inputs = [x.cuda() for x in _inputs(2, 6, 197, 64, 64, 50, 1, dtype=torch.float32)]
    out, grads = _run(inputs, backend, 1)
    ref, ref_grads = _run(inputs, "reference", 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_opcheck_custom_op():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(2 * 5)]).view(1, 2, 5, 3)
    for backend in ("masked", "gather"):
        torch.library.opcheck(torch.ops.visionzoo.sparse_attention, (q, k, v, idx, 0.5, 1, backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_masked_reuses_its_cpu_mask_buffer_safely():
    """Without gradients the CPU mask buffer is reused across calls of different shapes, in and out of
    inference mode; results stay those of the reference, and a call needing gradients gets its own mask."""
    from visionzoo.ops.sparse_attention import _masked

    for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
        for shape in (SHAPES[3], SHAPES[0], SHAPES[3]):
            *dims, P = shape
            q, k, v, idx = _inputs(*dims, P, dtype=torch.float32)
            with mode():
                out = sparse_attention(q, k, v, idx, 0.3, dense_rows=P, backend="masked")
            ref = sparse_attention(q, k, v, idx, 0.3, dense_rows=P, backend="reference")
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _masked._local.buffers  # the buffer path ran
    q, k, v, idx = _inputs(*SHAPES[0], dtype=torch.float32)
    mask = _masked.additive_mask(idx, 17, 1, torch.float32, reuse=False)
    assert mask.data_ptr() not in {b.data_ptr() for b in _masked._local.buffers.values()}
