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
    with pytest.raises(RuntimeError, match="'triton' does not support dtype"):
        selective_scan(**x, backend="triton")


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    assert _op.is_available("triton", "cpu")
    calls = []
    monkeypatch.setitem(_op.FORWARD, "chunked", lambda *a: calls.append(1) or _chunked.selective_scan_chunked(*a))
    run(make_inputs(length=3), "auto")
    assert calls
    assert "triton" not in _op.AUTO_ORDER  # opt-in until measured on a GPU


def test_env_override_selects_triton(monkeypatch):
    calls = []
    monkeypatch.setitem(_op.FORWARD, "triton", lambda *a: calls.append(1) or _triton.selective_scan_triton(*a))
    monkeypatch.setenv(ENV, "triton")
    run(make_inputs(length=3), "auto")
    assert calls == [1]


def test_unavailable_without_interpreter_or_triton(monkeypatch):
    x = make_inputs(length=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _op.is_available("triton", "cpu")
    with pytest.raises(RuntimeError, match="'triton' is not available on device type 'cpu'"):
        selective_scan(**x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton, "_kernel_module", None)  # as if `import triton` had failed
    assert not _op.is_available("triton", "cpu") and not _op.is_available("triton", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        selective_scan(**x, backend="triton")


def test_triton_is_imported_lazily():
    code = ("import sys, visionzoo, visionzoo.ops.selective_scan; "
            "assert 'visionzoo.ops.selective_scan._triton_kernel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


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
