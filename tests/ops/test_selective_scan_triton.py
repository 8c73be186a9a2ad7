"""Tests for the ``triton`` selective-scan backend, run on CPU in Triton's interpreter.

How ``TRITON_INTERPRET`` is honoured: Triton reads it when a Python function is wrapped by
``triton.jit``, and it wraps its own ``triton.language`` helpers (``tl.zeros``, ``tl.sum`` ...) when
Triton is imported. torch imports Triton as soon as ``torch.library`` (hence ``visionzoo``) is
imported, so the variable has to be in the environment before that: ``tests/conftest.py`` sets it
(when there is no GPU) right after ``import torch``, which does not import Triton; CI also sets it.
The module fixture below sets it again for the backend's ``is_available`` check. If Triton was
imported without it, the tests here are skipped (``_triton.interpret_enabled()``).
Sizes are tiny: the interpreter runs every program in Python.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from visionzoo.ops.selective_scan import (
    _chunked,
    _op,
    _reference,
    _triton,
    selective_scan,
)

from .test_selective_scan import OPTIONS, assert_close, make_inputs, run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or _triton.load() is None,
                                reason="triton does not import")
INTERPRETER_READY = os.environ.get("TRITON_INTERPRET") == "1" and _triton.interpret_enabled()

ENV = "VISIONZOO_BACKEND_SELECTIVE_SCAN"


@pytest.fixture(autouse=True, scope="module")
def interpret():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv(ENV, raising=False)
        yield


@pytest.fixture(autouse=True)
def needs_interpreter(request):
    """CPU tests need Triton's interpreter (the CUDA test compiles for the GPU)."""
    if "cuda" not in request.keywords and not INTERPRETER_READY:
        pytest.skip("needs TRITON_INTERPRET=1 in the environment before Triton is imported")


def as4d(x):
    B, C = x["B"], x["C"]
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    return B, C


@pytest.mark.parametrize("length", [5, 9])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("opts", OPTIONS)
def test_forward_matches_reference(length, groups, opts):
    D, z, bias, softplus = opts
    x = make_inputs(batch=2, dim=8, length=length, dstate=4, groups=groups, D=D, z=z, bias=bias)
    out_r, last_r, _ = run(x, "reference", softplus=softplus)
    out, last, _ = run(x, "triton", softplus=softplus)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert out.shape == out_r.shape and last.shape == last_r.shape
    assert_close(out, out_r, 1e-5, "out")
    assert_close(last, last_r, 1e-5, "last_state")


@pytest.mark.parametrize("dim,groups,block_d", [(8, 2, 2), (6, 2, 4), (6, 3, 8), (5, 1, 2)])
def test_channel_blocks_and_groups(dim, groups, block_d):
    """Blocks of channels that split or span groups, and a masked tail block."""
    x = make_inputs(batch=2, dim=dim, length=5, dstate=3, groups=groups)  # N=3: masked state lanes
    B, C = as4d(x)
    args = (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], True)
    out, last = _triton.selective_scan_triton(*args, block_d=block_d)
    out_r, last_r = _reference.selective_scan_reference(*args)
    assert_close(out, out_r, 1e-5, "out")
    assert_close(last, last_r, 1e-5, "last_state")


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[1]])
def test_grads_through_custom_op(groups, opts):
    D, z, bias, softplus = opts
    x = make_inputs(batch=2, dim=8, length=9, dstate=4, groups=groups, D=D, z=z, bias=bias)
    out_r, last_r, g_r = run(x, "reference", softplus=softplus, grads=True)
    out, last, g = run(x, "triton", softplus=softplus, grads=True)
    assert_close(out, out_r, 1e-5, "out")
    assert_close(last, last_r, 1e-5, "last_state")
    assert set(g) == set(g_r)
    for name in g_r:
        assert g[name].shape == g_r[name].shape
        assert_close(g[name], g_r[name], 1e-4, f"grad {name}")


# ---------------------------------------------------------------- backward kernel


def grads_of(x, backend, softplus=True, w_out=True, w_last=True, seed=1):
    """out, last_state and the grads of every input for sum(out * W1) + sum(last * W2)."""
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    out, last = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    if w_out:
        loss = loss + (out * torch.randn(out.shape, generator=g).to(out)).sum()
    if w_last:
        loss = loss + (last * torch.randn(last.shape, generator=g).to(last)).sum()
    loss.backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_parity(x, softplus=True, **kw):
    """Triton vs reference, fp32: rtol 6e-4 / atol 2e-3 for outputs, last state and all gradients."""
    out_r, last_r, g_r = grads_of(x, "reference", softplus, **kw)
    out, last, g = grads_of(x, "triton", softplus, **kw)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_r, rtol=6e-4, atol=2e-3)
    assert set(g) == set(g_r)
    for name in g_r:
        assert g[name].shape == x[name].shape and g[name].dtype == x[name].dtype, name
        # (reference leaves .grad None where the loss does not depend on an input, e.g. C for last_state)
        expected = g_r[name] if g_r[name] is not None else torch.zeros_like(x[name])
        torch.testing.assert_close(g[name], expected, rtol=6e-4, atol=2e-3, msg=f"grad {name}")
    return g


@pytest.mark.parametrize("batch,dim,groups,length,dstate", [
    (1, 4, None, 5, 4),  # one chunk, shorter than CHUNK
    (1, 6, 3, 17, 5),  # two chunks (the last one a single step); 2 channels per group, N not a power of 2
    pytest.param(2, 8, 2, 33, 16, marks=pytest.mark.slow),  # three chunks
    pytest.param(2, 5, None, 16, 8, marks=pytest.mark.slow),  # exactly one full chunk, odd dim
])
def test_backward_kernel_matches_reference(batch, dim, groups, length, dstate):
    x = make_inputs(batch=batch, dim=dim, length=length, dstate=dstate, groups=groups, seed=dim + length)
    assert_parity(x)


@pytest.mark.parametrize("opts", OPTIONS[1:])
def test_backward_options(opts):
    D, z, bias, softplus = opts
    x = make_inputs(batch=1, dim=4, length=7, dstate=4, groups=2, D=D, z=z, bias=bias, seed=5)
    assert_parity(x, softplus)


@pytest.mark.parametrize("chunk,block_d", [(1, 1), (3, 2), (7, 1)])
def test_backward_chunk_and_block_sizes(chunk, block_d):
    """Checkpoint chunks of 1 step, of a size that does not divide L, and L itself; several channel blocks."""
    x = make_inputs(batch=1, dim=4, length=7, dstate=3, groups=2, seed=11)
    B, C = as4d(x)
    args = (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], True)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(1, 4, 7, generator=g)
    gl = torch.randn(1, 4, 3, generator=g)
    ref = _chunked.selective_scan_chunked_backward(*args, go, gl)
    got = _triton.selective_scan_triton_backward(*args, go, gl, chunk=chunk, block_d=block_d)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), got, ref):
        torch.testing.assert_close(a, b, rtol=6e-4, atol=2e-3, msg=f"grad {name}")


@pytest.mark.parametrize("w_out,w_last", [(True, False), (False, True)])
def test_backward_out_only_or_last_state_only(w_out, w_last):
    x = make_inputs(batch=1, dim=4, length=5, dstate=4, seed=2)
    assert_parity(x, w_out=w_out, w_last=w_last)


def test_backward_large_delta_and_decay():
    """exp(delta A) underflows to 0 for some steps: the backward must stay exact (no division by it)."""
    x = make_inputs(batch=1, dim=4, length=7, dstate=4, delta_scale=8.0, seed=4)
    x["A"] = x["A"] * 10
    assert_parity(x)


def test_backward_time_major_layout():
    """Vim passes (B, C, L) views of (B, L, C) activations: grads come back with the inputs' layout."""
    x = make_inputs(batch=1, dim=4, length=5, dstate=4, groups=2, seed=6)
    for k in ("u", "delta", "z"):
        x[k] = x[k].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    g = assert_parity(x)
    assert g["u"].permute(2, 0, 1).is_contiguous()


def test_backward_low_precision():
    x = make_inputs(batch=1, dim=4, length=5, dstate=4, groups=2, seed=8)
    x16 = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    _, _, g_r = grads_of({k: v.float() for k, v in x16.items()}, "reference")
    _, _, g = grads_of(x16, "triton")
    for name in g_r:
        assert g[name].dtype == x16[name].dtype
        assert_close(g[name].float(), g_r[name], 2e-2, f"grad {name}")


def test_backward_memory_is_not_batch_dim_length_state(monkeypatch):
    """No buffer of the backward holds (batch, dim, L, N) values: checkpoints every CHUNK steps + one chunk."""
    batch, dim, length, dstate = 1, 4, 40, 4
    x = make_inputs(batch=batch, dim=dim, length=length, dstate=dstate, seed=12)
    B, C = as4d(x)
    args = (x["u"], x["delta"], x["A"], B, C, x["D"], x["z"], x["delta_bias"], True)
    sizes = []
    real_empty = torch.empty

    def recording_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    go = torch.randn(batch, dim, length)
    monkeypatch.setattr(torch, "empty", recording_empty)
    got = _triton.selective_scan_triton_backward(*args, go, None)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert sizes and max(sizes) < batch * dim * length * dstate / 2, sizes
    ref = _chunked.selective_scan_chunked_backward(*args, go, None)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=6e-4, atol=2e-3)


def test_backward_uses_the_triton_kernel(monkeypatch):
    calls = []
    real = _triton.selective_scan_triton_backward
    monkeypatch.setattr(_triton, "selective_scan_triton_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(_chunked, "selective_scan_chunked_backward", None)  # must not be reached
    grads_of(make_inputs(batch=1, dim=4, length=3, dstate=2), "triton")
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x = make_inputs(batch=2, dim=8, length=5, dstate=4, groups=2)
    xl = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    out_r, last_r, _ = run(xl, "reference")
    out, last, _ = run(xl, "triton")
    assert out.dtype == dtype and last.dtype == torch.float32
    assert_close(out, out_r, 1e-2, "out")
    assert_close(last, last_r, 1e-4, "last_state")


def test_time_major_layout_is_kept():
    x = make_inputs(batch=1, dim=8, length=5, dstate=4)
    x["u"] = x["u"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out, _, _ = run(x, "triton")
    assert out.permute(2, 0, 1).is_contiguous()
    out_r, _, _ = run(x, "reference")
    assert_close(out, out_r, 1e-5, "out")


def test_float64_falls_back_or_raises(monkeypatch):
    x = make_inputs(batch=1, dim=4, length=3, dstate=2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: does not support dtype"):
        selective_scan(**x, backend="triton")


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    assert _op.is_available("triton", "cpu")
    x = make_inputs(length=3)
    assert _op.resolve("auto", x["u"]) in ("cpu", "chunked")  # whichever CPU backend auto prefers
    triton = _op.SCAN.by_name["triton"]
    monkeypatch.setitem(_op.SCAN.by_name, "triton", dataclasses.replace(triton, forward=None))  # would fail if called
    run(x, "auto", grads=True)
    assert "triton" not in _op.AUTO_ORDER  # opt-in until measured on a GPU


def test_env_override_selects_triton(monkeypatch):
    calls = []
    triton = _op.SCAN.by_name["triton"]
    monkeypatch.setitem(_op.SCAN.by_name, "triton", dataclasses.replace(
        triton, forward=lambda *a: calls.append(1) or _triton.selective_scan_triton(*a)))
    monkeypatch.setenv(ENV, "triton")
    run(make_inputs(length=3), "auto")
    assert calls == [1]


def test_unavailable_without_interpreter_or_triton(monkeypatch):
    x = make_inputs(length=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _op.is_available("triton", "cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: not available on device type 'cpu'"):
        selective_scan(**x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton.KERNELS, "_module", None)  # as if `import triton` had failed
    assert not _op.is_available("triton", "cpu") and not _op.is_available("triton", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        selective_scan(**x, backend="triton")


def test_triton_is_imported_lazily():
    code = ("import sys, visionzoo, visionzoo.ops.selective_scan; "
            "assert 'visionzoo.ops.selective_scan._triton_kernel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# Compiled-mode builds of both kernels for sm_80 / sm_90 at every Vim size: tests/ops/test_gpu_compile.py.


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compile for the GPU
    x = make_inputs(batch=2, dim=64, length=70, dstate=16, groups=2)
    out_r, last_r, g_r = run(x, "reference", grads=True)
    xc = {k: v.cuda().to(dtype) if k in ("u", "delta", "z", "B", "C") else v.cuda() for k, v in x.items()}
    out, last, g = run(xc, "triton", grads=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and out.is_cuda
    assert_close(out.cpu(), out_r, tol, "out")
    assert_close(last.cpu(), last_r, tol, "last_state")
    for name in g_r:
        assert_close(g[name].cpu(), g_r[name], 10 * tol, f"grad {name}")
