"""The ``flex`` backends (FlexAttention) of bi-level routing attention and sparse attention vs ``reference``.

Outputs run the real path on CPU: ``torch.compile(flex_attention)`` (Inductor's C++ kernel; ~10-20 s to
compile per shape, so the default run keeps one shape per op and the rest are ``slow``). FlexAttention
has no CPU backward (torch 2.14 refuses inputs that require grad), so gradients are checked with the
same ``BlockMask`` and ``mask_mod`` through FlexAttention's eager higher-order op, whose backward is
PyTorch's dense math implementation: this checks what the backends own (the mask built from the
routing / key sets); the compiled CUDA backward is PyTorch's.
"""
from __future__ import annotations

import pytest
import torch

from visionzoo.ops import _flex
from visionzoo.ops.routing_attention._common import from_regions, route, to_regions
from visionzoo.ops.routing_attention._flex import bra_flex, routing_block_mask
from visionzoo.ops.routing_attention._reference import bra_reference
from visionzoo.ops.sparse_attention._flex import sparse_attention_flex
from visionzoo.ops.sparse_attention._reference import keep_mask, sparse_attention_reference

pytestmark = pytest.mark.skipif(_flex.unavailable_reason("cpu") is not None, reason="no FlexAttention in this torch")


def _eager_flex(q, k, v, block_mask, scale):
    """FlexAttention's higher-order op called eagerly: dense math forward and backward (CPU autograd)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention.flex_attention import _identity

    out, *_ = flex_hop(q, k, v, _identity, block_mask.as_tuple(), scale,
                       {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}, (), ())
    return out


def _bra_reference(q, k, v, m, n, topk, scale):
    idx = route(q, k, n, n, topk, scale)
    regions = (to_regions(x, n, n, m) for x in (q, k, v))
    return from_regions(bra_reference(*regions, idx, scale), n, n, q.shape[1], q.shape[2])


def _bra_inputs(B, H, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, H, C, generator=g) for _ in range(3)]


def _sparse_inputs(B, heads, N, d, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, heads, N, d, generator=g) for _ in range(3))
    idx = torch.rand(B, heads, N - 1, N, generator=g).topk(K, dim=-1).indices
    return q, k, v, idx


# (B, H=W, C, heads, n_win, topk): region sides of 4 and 9 tokens; 128-token tiles straddle regions
BRA_CASES = [(2, 12, 32, 2, 3, 2), pytest.param((1, 36, 32, 2, 4, 3), marks=pytest.mark.slow),
             pytest.param((1, 28, 64, 4, 7, 4), marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", BRA_CASES)
def test_bra_flex_output_matches_reference(case):
    B, H, C, m, n, topk = case
    q, k, v = _bra_inputs(B, H, C)
    with torch.no_grad():
        out, idx = bra_flex(q, k, v, m, n, n, topk, C ** -0.5)
    torch.testing.assert_close(out, _bra_reference(q, k, v, m, n, topk, C ** -0.5), rtol=0, atol=1e-4)
    assert torch.equal(idx, route(q, k, n, n, topk, C ** -0.5))


@pytest.mark.parametrize("case", [(2, 12, 32, 2, 3, 2), (1, 36, 16, 1, 4, 3), (1, 14, 16, 2, 7, 49)])
def test_bra_flex_gradients_match_reference(case, monkeypatch):
    B, H, C, m, n, topk = case
    q, k, v = (x.requires_grad_() for x in _bra_inputs(B, H, C, seed=1))
    monkeypatch.setattr(_flex, "flex_attention", _eager_flex)
    out, _ = bra_flex(q, k, v, m, n, n, topk, C ** -0.5)
    ref = _bra_reference(q, k, v, m, n, topk, C ** -0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_routing_block_mask_tiles():
    """Tiles flagged skipped hold no routed token pair, tiles flagged full only routed ones, and the
    mask_mod is the region-expanded routing."""
    S2, w2, topk = 36, 9, 3  # 324 tokens: three 128-token tiles, the last ragged
    idx = torch.rand(2, S2, S2).topk(topk, dim=-1).indices
    bm = routing_block_mask(idx, w2)
    routed = torch.zeros(2, S2, S2, dtype=torch.bool).scatter_(2, idx, True)
    tokens = routed.repeat_interleave(w2, 1).repeat_interleave(w2, 2)  # (2, L, L)
    L, T = S2 * w2, _flex.BLOCK
    tiles = -(-L // T)
    padded = torch.zeros(2, tiles * T, tiles * T, dtype=torch.bool)
    padded[:, :L, :L] = tokens
    per_tile = padded.view(2, tiles, T, tiles, T).permute(0, 1, 3, 2, 4).flatten(3)
    dense = bm.to_dense()[:, 0]  # (2, tiles, tiles): 1 where the tile is computed (partial or full)
    assert torch.equal(dense.bool(), per_tile.any(-1))
    full_num, full_idx = bm.full_kv_num_blocks[:, 0], bm.full_kv_indices[:, 0]
    for b in range(2):
        for i in range(tiles):
            for j in full_idx[b, i, : full_num[b, i]].tolist():
                assert per_tile[b, i, j].all() and i < tiles - 1 and j < tiles - 1
    b, h = torch.tensor(1), torch.tensor(0)
    q_idx, kv_idx = torch.tensor(40), torch.arange(L)
    got = torch.stack([bm.mask_mod(b, h, q_idx, kv) for kv in kv_idx])
    assert torch.equal(got, tokens[1, 40])


SPARSE_CASES = [(2, 3, 50, 16, 7), pytest.param((1, 2, 197, 32, 20), marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_flex_output_matches_reference(case):
    q, k, v, idx = _sparse_inputs(*case)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        out = sparse_attention_flex(q, k, v, idx, scale, 1)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, idx, scale, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", [(2, 3, 50, 16, 7), (1, 2, 197, 32, 20), (1, 1, 130, 8, 1)])
def test_sparse_flex_gradients_match_reference(case, monkeypatch):
    q, k, v, idx = _sparse_inputs(*case, seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5
    monkeypatch.setattr(_flex, "flex_attention", _eager_flex)
    out = sparse_attention_flex(q, k, v, idx, scale, 1)
    ref = sparse_attention_reference(q, k, v, idx, scale, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_sparse_block_mask_is_the_keep_mask():
    from visionzoo.ops.sparse_attention._flex import sparse_block_mask

    _, _, _, idx = _sparse_inputs(1, 2, 50, 8, 5)
    bm = sparse_block_mask(idx, 50, 1)
    keep = keep_mask(idx, 50, 1)
    got = torch.stack([bm.mask_mod(torch.tensor(0), torch.tensor(1), torch.tensor(i), torch.arange(50))
                       for i in range(50)])
    assert torch.equal(got, keep[0, 1])


def _check_cuda(run, reference, inputs, dtype, tol):
    """``run`` on CUDA ``inputs`` in ``dtype`` vs ``reference`` in fp32: outputs and gradients."""
    low = [x.cuda().to(dtype).requires_grad_() for x in inputs]
    ref = [x.cuda().float().requires_grad_() for x in inputs]
    out, want = run(*low), reference(*ref)
    g = torch.randn_like(want)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=tol)
    for got, exp in zip(torch.autograd.grad(out, low, g.to(dtype)), torch.autograd.grad(want, ref, g)):
        torch.testing.assert_close(got.float(), exp, rtol=0, atol=tol * 10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_flex_cuda_matches_reference(dtype, tol):
    """On a GPU: the compiled FlexAttention kernels, forward and backward, at a BiFormer-T stage-2 shape
    and the Sparsifiner DeiT-S shape at 224 (16-bit inputs against an fp32 reference)."""
    scale = 128 ** -0.5
    _check_cuda(lambda q, k, v: bra_flex(q, k, v, 4, 7, 7, 4, scale)[0],
                lambda q, k, v: _bra_reference(q, k, v, 4, 7, 4, scale), _bra_inputs(2, 28, 128), dtype, tol)
    q, k, v, idx = _sparse_inputs(2, 6, 197, 64, 40)
    idx = idx.cuda()
    _check_cuda(lambda q, k, v: sparse_attention_flex(q, k, v, idx, 0.125, 1),
                lambda q, k, v: sparse_attention_reference(q, k, v, idx, 0.125, 1), (q, k, v), dtype, tol)
