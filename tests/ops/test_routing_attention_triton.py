"""Tests for the ``triton`` BRA backend (fused gather + flash attention, forward and backward), run on CPU
in Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before Triton is imported (``tests/conftest.py`` sets
it when there is no GPU; CI sets it too); otherwise the CPU tests here are skipped. The interpreter runs
every program in Python, so the shapes are tiny (1-2 heads, 8-16 channels, 4-80-token regions): the
point is the indexing (region addresses, key tiles spanning several routed regions, partial tiles,
non-square grids, C_v != C_qk, batch offsets), the online softmax and the inverse-routing backward.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from visionzoo.ops.routing_attention import _op, _triton, bi_level_routing_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or _triton.load() is None,
                                reason="triton does not import")
INTERPRETER_READY = os.environ.get("TRITON_INTERPRET") == "1" and _triton.interpret_enabled()
ENV = "VISIONZOO_BACKEND_ROUTING_ATTENTION"


@pytest.fixture(autouse=True)
def needs_interpreter(request, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    if "cuda" not in request.keywords and not INTERPRETER_READY:
        pytest.skip("needs TRITON_INTERPRET=1 in the environment before Triton is imported")


# (B, H, W, C_qk, C_v, heads, n_win, topk)
SHAPES = [
    (1, 4, 4, 8, 8, 2, 2, 2),  # 2x2-token regions (4 tokens), key tile spans both routed regions
    (1, 8, 8, 16, 16, 2, 2, 1),  # 16-token regions, topk 1
    (1, 16, 16, 8, 8, 1, 2, 3),  # 64-token regions, 192 keys: three key tiles
    (1, 6, 4, 8, 16, 2, (2, 2), 4),  # 3x2 regions (6 tokens), topk = all regions, C_v != C_qk
    (2, 4, 8, 8, 8, 1, (2, 4), 3),  # batch offsets, non-square region grid
    (1, 10, 8, 8, 8, 1, 1, 1),  # one 80-token region: two query tiles, two key tiles
]


def _inputs(B, H, W, c_qk, c_v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, c, generator=g).to(dtype) for c in (c_qk, c_qk, c_v)]


def _weights(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _triton_run(inputs, heads, n_win, topk, needs=(True, True, True)):
    leaves = [x.clone().requires_grad_(need) for x, need in zip(inputs, needs)]
    scale = inputs[0].shape[-1] ** -0.5
    out, idx = bi_level_routing_attention(*leaves, heads, n_win, topk, scale, return_routing=True, backend="triton")
    (out.float() * _weights(out.shape)).sum().backward()
    return out, idx, [x.grad if need else None for x, need in zip(leaves, needs)]


def _reference_run(inputs, heads, n_win, idx):
    """The reference algorithm in float32 on the given inputs, with the routing ``idx`` fixed."""
    leaves = [x.detach().float().requires_grad_(True) for x in inputs]
    n_h, n_w = (n_win, n_win) if isinstance(n_win, int) else n_win
    out = _op._reference_spatial(*leaves, idx, heads, n_h, n_w, inputs[0].shape[-1] ** -0.5)
    (out * _weights(out.shape)).sum().backward()
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_float32(shape):
    B, H, W, c_qk, c_v, heads, n_win, topk = shape
    inputs = _inputs(B, H, W, c_qk, c_v)
    out, idx, grads = _triton_run(inputs, heads, n_win, topk)
    _, ref_idx = bi_level_routing_attention(*inputs, heads, n_win, topk, c_qk ** -0.5, return_routing=True,
                                            backend="reference")
    assert torch.equal(idx, ref_idx)
    ref, ref_grads = _reference_run(inputs, heads, n_win, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_triton_half_precision(dtype, tol):
    """fp16/bf16 in, fp32 softmax and accumulation: against the float32 reference on the same (rounded)
    inputs and the same routing; outputs and gradients in the input dtype. (In the interpreter, bf16 tiles
    are multiplied in fp32 because its bf16 ``tl.dot`` is wrong; the native bf16 dot is covered by the CUDA
    test only.)"""
    B, H, W, c_qk, c_v, heads, n_win, topk = SHAPES[3]
    inputs = _inputs(B, H, W, c_qk, c_v, dtype=dtype)
    out, idx, grads = _triton_run(inputs, heads, n_win, topk)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = _reference_run(inputs, heads, n_win, idx)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=tol, atol=tol)


def test_triton_partial_grads_and_strided_inputs():
    """Channel slices of one qkv tensor (the model's layout) are read in place; only requested
    gradients are computed (q alone; k and v alone)."""
    B, H, W, C, heads, n_win, topk = 1, 4, 8, 8, 2, (2, 2), 2
    qkv = torch.randn(B, H, W, 3 * C, generator=torch.Generator().manual_seed(5))
    inputs = list(qkv.split(C, dim=-1))
    ref_out, idx, ref_grads = _triton_run([x.contiguous() for x in inputs], heads, n_win, topk)
    for needs in ((True, False, False), (False, True, True)):
        out, idx2, grads = _triton_run(inputs, heads, n_win, topk, needs)
        assert torch.equal(idx2, idx)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        for g, r, need in zip(grads, ref_grads, needs):
            if need:
                torch.testing.assert_close(g, r, rtol=0, atol=0)
            else:
                assert g is None


def test_triton_errors_and_selection():
    q, k, v = _inputs(1, 4, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: does not support dtype torch.float64"):
        bi_level_routing_attention(q, k, v, 2, 2, 1, 0.5, backend="triton")
    assert _op.resolve("auto", q.float()) == "chunked"  # the interpreter is never picked automatically


def test_triton_inverse_routing():
    idx = torch.tensor([[[1, 2], [1, 0], [2, 1]]])  # 3 query regions, topk 2
    offsets, inverse = _triton._inverse_routing(idx, 3)
    assert offsets.tolist() == [[0, 1, 4, 6]]
    # key region 0 <- query 1; key 1 <- queries 0, 1, 2; key 2 <- queries 0, 2
    assert inverse.tolist() == [[1, 0, 1, 2, 0, 2]]


def test_opcheck_triton_op():
    q, k, v = (torch.randn(1, 4, 4, 8) for _ in range(3))
    torch.library.opcheck(torch.ops.visionzoo.bi_level_routing_attention_triton, (q, k, v, 2, 2, 2, 2, 0.35),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_triton_cuda_tiny_stage_shapes(dtype, tol):
    """biformer_tiny's three BRA stage shapes at 224 (batch 2) on the GPU, against the reference."""
    for side, C, heads, topk in ((56, 64, 2, 1), (28, 128, 4, 4), (14, 256, 8, 16)):
        inputs = [x.cuda() for x in _inputs(2, side, side, C, C, dtype=dtype)]
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out, idx = bi_level_routing_attention(*leaves, heads, 7, topk, C ** -0.5, return_routing=True,
                                              backend="triton")
        w = _weights(out.shape).cuda()
        (out.float() * w).sum().backward()
        ref_leaves = [x.detach().float().requires_grad_(True) for x in inputs]
        ref = _op._reference_spatial(*ref_leaves, idx, heads, 7, 7, C ** -0.5)
        (ref * w).sum().backward()
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        for leaf, r in zip(leaves, ref_leaves):
            torch.testing.assert_close(leaf.grad.float(), r.grad, rtol=tol, atol=tol)


# Compiled-mode builds of the three kernels for sm_80 / sm_90 at every BiFormer stage shape, fp32 (IEEE and
# TF32 dots), bf16 and fp16: tests/ops/test_gpu_compile.py.


def test_triton_is_imported_lazily():
    code = ("import sys, visionzoo, visionzoo.ops.routing_attention; "
            "assert 'visionzoo.ops.routing_attention._triton_kernel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
