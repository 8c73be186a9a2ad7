"""Tests for the ``triton`` sparse-attention backend, on CPU in Triton's interpreter.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` (without a GPU) before Triton is imported; if Triton was
imported without it, the CPU tests here are skipped (``_triton.interpret_enabled()``). Sizes are tiny
and the block sizes are shrunk so that every launch has several row blocks and key blocks, partial
ones included.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.ops.sparse_attention import _triton, sparse_attention, sparse_attention_backend

from .test_sparse_attention import _inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or _triton.load() is None,
                                reason="triton does not import")
INTERPRETER_READY = os.environ.get("TRITON_INTERPRET") == "1" and _triton.interpret_enabled()
ENV = "VISIONZOO_BACKEND_SPARSE_ATTENTION"

# (B, H, N, d, d_v, K, dense_rows): odd token counts, d and d_v not powers of two, K = 1 and K = N,
# no / one / two dense rows.
SHAPES = [
    (2, 2, 17, 8, 8, 5, 1),
    (1, 2, 13, 6, 5, 13, 0),
    (2, 1, 9, 4, 8, 1, 2),
    (1, 2, 23, 16, 16, 7, 1),
]


@pytest.fixture(autouse=True)
def small_blocks(request, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    if "cuda" not in request.keywords:
        if not INTERPRETER_READY:
            pytest.skip("needs TRITON_INTERPRET=1 in the environment before Triton is imported")
        monkeypatch.setattr(_triton, "BLOCK_M", 4)
        monkeypatch.setattr(_triton, "BLOCK_K", 4)


def _run(inputs, backend, P, w):
    q, k, v, idx = inputs
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sparse_attention(*leaves, idx, q.shape[-1] ** -0.5, dense_rows=P, backend=backend)
    (out * w.to(out.dtype)).sum().backward()
    return out, [x.grad for x in leaves]


def _compare(shape, dtype, out_tol, grad_tol, device="cpu"):
    *dims, P = shape
    inputs64 = _inputs(*dims, P, dtype=torch.float64)
    inputs = [x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in inputs64]
    w = torch.randn(*dims[:3], dims[4], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    out, grads = _run(inputs, "triton", P, w)
    # reference in fp64 on the same (rounded) values and output weights
    ref, ref_grads = _run([x.double() if x.is_floating_point() else x for x in inputs], "reference", P, w)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=out_tol, atol=out_tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=grad_tol, atol=grad_tol, msg=f"d{name}")


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_outputs_and_grads_match_reference(shape):
    _compare(shape, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision(dtype, tol):
    _compare((1, 2, 9, 8, 8, 3, 1), dtype, tol, 2 * tol)


def test_strided_inputs_and_partial_grads():
    """q, k, v as the model makes them (views of one qkv tensor); only k and v need gradients."""
    B, H, N, d, K = 2, 2, 11, 8, 4
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    idx = torch.rand(B, H, N - 1, N, generator=g).argsort(-1)[..., :K]
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = sparse_attention(q, kk, vv, idx, 0.35, backend="triton")
    out.square().sum().backward()
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    ref = sparse_attention(q, k2, v2, idx, 0.35, backend="reference")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kk.grad, k2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vv.grad, v2.grad, rtol=1e-5, atol=1e-5)


def test_auto_never_picks_the_interpreter_and_fp64_is_refused(monkeypatch):
    q, k, v, idx = _inputs(*SHAPES[0])
    assert sparse_attention_backend("auto", q.float()) == "masked"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: does not support dtype torch.float64"):
        sparse_attention(q, k, v, idx, 0.3, backend="triton")  # fp64
    monkeypatch.setenv(ENV, "triton")
    assert sparse_attention_backend("auto", q.float()) == "triton"


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(2 * 5)]).view(1, 2, 5, 3)
    torch.library.opcheck(torch.ops.visionzoo.sparse_attention, (q, k, v, idx, 0.5, 1, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_model_forward_and_backward_match_masked():
    """A whole (tiny) Sparsifiner, token pruning included: logits and parameter gradients."""
    torch.manual_seed(0)
    model = timm.create_model("test_sparsifiner", depth=2, attn_self_distill_weight=0.0, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for backend in ("masked", "triton"):
        for block in model.blocks:
            block.attn.attn_backend = backend
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None})
    torch.testing.assert_close(results["triton"][0], results["masked"][0], rtol=1e-4, atol=1e-5)
    assert results["triton"][1].keys() == results["masked"][1].keys()
    for name, g in results["masked"][1].items():
        torch.testing.assert_close(results["triton"][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_cuda_compiled_kernel(dtype, tol):
    """The compiled kernel at DeiT-S shapes (N = 197, K = 50, d = 64) with the default block sizes."""
    _compare((2, 6, 197, 64, 64, 50, 1), dtype, tol, 2 * tol, device="cuda")
