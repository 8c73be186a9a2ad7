"""Tests for the ``triton`` ``na2d_av`` backend, run on CPU in Triton's interpreter (tiny sizes).

``TRITON_INTERPRET=1`` must be in the environment before Triton is first imported (``tests/conftest.py``
sets it when there is no GPU; see ``test_selective_scan_triton.py``). Without it the CPU tests skip.
Sizes are small because the interpreter runs every program in Python; large ``block_p`` keeps the
number of programs (the interpreter's cost) down where the test is not about blocking.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from visionzoo.ops.neighborhood_aggregation import _op, _triton, na2d_av

from .test_neighborhood_aggregation import _inputs, naive_na2d_av

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or _triton.load() is None,
                                reason="triton does not import")
INTERPRETER_READY = os.environ.get("TRITON_INTERPRET") == "1" and _triton.is_available("cpu")
ENV = "VISIONZOO_BACKEND_NEIGHBORHOOD_AGGREGATION"

# (B, G, H, W, c, K): every kernel size OverLoCK uses (5, 7, 13) and 3; odd, non-square, window == map,
# maps narrower than 2K (border pile-up on both sides at once).
SHAPES = [
    (2, 1, 6, 9, 2, 3),
    (1, 2, 9, 11, 3, 5),  # odd H and W
    (1, 1, 5, 12, 2, 5),  # H == K: every row sees the whole height
    (1, 1, 7, 7, 3, 7),  # window == map (OverLoCK stage 4 at 224)
    (1, 1, 8, 11, 2, 7),
    (1, 1, 13, 14, 2, 13),  # OverLoCK stage 3's large kernel on a ~14x14 map
]


def _run(attn, value, K, backend):
    """Output and the gradients of ``(out * w).sum()`` (``w`` drawn in fp32 on the CPU, then cast)."""
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    out = na2d_av(a, v, K, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    (out * w).sum().backward()
    return out.detach(), a.grad, v.grad


@pytest.fixture
def one_program_per_map(monkeypatch):
    """256-pixel blocks: one program per (image, group) for these maps (the interpreter's cost is per program)."""
    blocks = _triton._blocks
    monkeypatch.setattr(_triton, "_blocks", lambda hw, c, bp, bc: blocks(hw, c, bp or 256, bc))


@pytest.fixture(autouse=True)
def needs_interpreter(request, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    if "cuda" not in request.keywords and not INTERPRETER_READY:
        pytest.skip("needs TRITON_INTERPRET=1 in the environment before Triton is imported")


def _close(got, ref, tol):
    for name, o, r in zip(("out", "grad attn", "grad value"), got, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(shape, one_program_per_map):
    """Output and both gradients equal the reference up to summation order."""
    *_, K = shape
    attn, value = _inputs(*shape, dtype=torch.float32)
    _close(_run(attn, value, K, "triton"), _run(attn, value, K, "reference"), 1e-5)


def test_matches_naive_definition():
    attn, value = _inputs(1, 1, 6, 7, 2, 5, dtype=torch.float32, seed=4)
    torch.testing.assert_close(na2d_av(attn, value, 5, backend="triton").double(), naive_na2d_av(attn, value, 5),
                               rtol=1e-6, atol=1e-6)


def test_pixel_and_channel_blocks():
    """Three pixel blocks (masked tail), three channel blocks (masked lanes; d attn's multi-chunk loop)."""
    K, block_p, block_c = 3, 16, 2
    attn, value = _inputs(1, 1, 5, 7, 5, K, dtype=torch.float32, seed=2)
    g = torch.randn(value.shape, generator=torch.Generator().manual_seed(5))
    out = _triton.triton_forward(attn, value, K, block_p=block_p, block_c=block_c)
    ga, gv = _triton.triton_backward(attn, value, K, g, (True, True), block_p=block_p, block_c=block_c)
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    ref = na2d_av(a, v, K, backend="reference")
    ref_ga, ref_gv = torch.autograd.grad(ref, (a, v), g)
    _close((out, ga, gv), (ref.detach(), ref_ga, ref_gv), 1e-5)


def test_strided_inputs_are_read_in_place(one_program_per_map):
    """ContMix's value is a permuted view of an NCHW map; grad_out non-contiguous too."""
    B, G, H, W, c, K = 1, 1, 6, 7, 3, 5
    x = torch.randn(B, 2, G, c, H, W)
    value = x.permute(1, 0, 2, 4, 5, 3)[1]  # (B, G, H, W, c) with channel stride H*W
    assert not value.is_contiguous()
    attn = torch.randn(B, G, H, W, K * K).softmax(-1)
    g = torch.randn(B, G, c, H, W).permute(0, 1, 3, 4, 2)
    got = _triton.triton_forward(attn, value, K)
    got_grads = _triton.triton_backward(attn, value, K, g, (True, True))
    a, v = attn.clone().requires_grad_(), value.contiguous().requires_grad_()
    ref = na2d_av(a, v, K, backend="reference")
    _close((got, *got_grads), (ref.detach(), *torch.autograd.grad(ref, (a, v), g)), 1e-5)
    # the public function passes the view straight through
    _close(_run(attn, value, K, "triton"), _run(attn, value.contiguous(), K, "reference"), 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision(dtype, tol, one_program_per_map):
    """fp16 / bf16 in and out, fp32 accumulation: close to the fp32 reference on the same rounded inputs."""
    K = 5
    attn, value = _inputs(1, 1, 6, 7, 4, K, dtype=torch.float32, seed=6)
    attn, value = attn.to(dtype), value.to(dtype)
    got = _run(attn, value, K, "triton")
    ref = _run(attn.float(), value.float(), K, "reference")
    assert all(t.dtype == dtype for t in got)
    for o, r in zip(got, ref):
        torch.testing.assert_close(o.float(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("which", [0, 1])
def test_partial_grads(which):
    K = 3
    attn, value = _inputs(1, 1, 5, 6, 2, K, dtype=torch.float32, seed=7)
    ref = _run(attn, value, K, "reference")
    a = attn.clone().requires_grad_(which == 0)
    v = value.clone().requires_grad_(which == 1)
    out = na2d_av(a, v, K, backend="triton")
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    got = (a if which == 0 else v).grad
    torch.testing.assert_close(got, ref[1 + which], rtol=1e-5, atol=1e-5)
    assert (v if which == 0 else a).grad is None


def test_opcheck():
    attn, value = _inputs(1, 1, 5, 5, 2, 3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.visionzoo.na2d_av, (attn, value, 3, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    monkeypatch.setattr(_triton, "is_available", lambda device_type: True)
    assert _op.resolve("auto", cuda) == "triton"
    assert _op.resolve("auto", types.SimpleNamespace(device=cuda.device, dtype=torch.float64)) == "torch"
    assert _op.resolve("auto", torch.zeros(1)) == "torch"  # CPU: the interpreter is for tests only
    monkeypatch.setattr(_triton, "is_available", lambda device_type: False)  # no triton: the old fallback
    assert _op.resolve("auto", cuda) == "torch"


def test_env_override_dtype_fallback_and_errors(monkeypatch):
    attn, value = _inputs(1, 1, 5, 5, 2, 3)  # float64
    monkeypatch.setenv(ENV, "triton")
    torch.testing.assert_close(na2d_av(attn, value, 3), na2d_av(attn, value, 3, backend="reference"))
    assert _op.resolve("auto", value) == "torch"  # fp64 leaves triton for torch
    assert _op.resolve("auto", value.float()) == "triton"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: does not support dtype torch.float64"):
        na2d_av(attn, value, 3, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        _triton.triton_forward(attn.float(), value.float(), 3, block_p=24)


def test_block_sizes():
    assert _triton._blocks(14 * 14, 16, None, None) == (128, 16)
    assert _triton._blocks(7 * 7, 14, None, None) == (64, 16)  # no 128-pixel block for a 49-pixel map
    assert _triton._blocks(50 * 84, 70, None, None) == (32, 64)  # channel blocks of 64
    assert _triton._blocks(5 * 5, 2, None, None) == (32, 2)


def test_unavailable_without_interpreter_or_triton(monkeypatch):
    attn, value = _inputs(1, 1, 5, 5, 2, 3, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _op.is_available("triton", "cpu")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here: not available on device type 'cpu'"):
        na2d_av(attn, value, 3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton.KERNELS, "_module", None)  # as if `import triton` had failed
    assert not _op.is_available("triton", "cpu") and not _op.is_available("triton", "cuda")


def test_triton_is_imported_lazily():
    code = ("import sys, visionzoo, visionzoo.ops.neighborhood_aggregation; "
            "assert 'visionzoo.ops.neighborhood_aggregation._triton_kernel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# Compiled-mode builds of the three kernels for sm_80 / sm_90 at every OverLoCK ContMix shape (kernel sizes
# 3..13), fp32, bf16 and fp16: tests/ops/test_gpu_compile.py.


def test_contmix_block_small_map(one_program_per_map):
    """A ContMix block (strided value views, 5x5 and 7x7 kernels) on a 6x6 map, smaller than K=7 (the
    official bilinear resize path): outputs and parameter gradients equal the reference backend's."""
    from visionzoo.models.overlock import ContMixBlock

    torch.manual_seed(0)
    block = ContMixBlock(8, 4, kernel_size=7, smk_size=5, num_groups=2, ls_init_value=1.0).eval()
    with torch.no_grad():
        for p in (block.rpb1, block.rpb2):
            p.normal_(0, 0.5)
    x, h = torch.randn(1, 8, 6, 6), torch.randn(1, 4, 6, 6)
    results = {}
    for backend in ("reference", "triton"):
        block.backend = backend
        block.zero_grad()
        xo, ho = block(x, h, h)
        (xo.square().sum() + ho.square().sum()).backward()
        results[backend] = (xo.detach(), ho.detach(), {n: p.grad.clone() for n, p in block.named_parameters()})
    ref, got = results["reference"], results["triton"]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 14, 14, 16, 5), (2, 8, 14, 14, 16, 13), (2, 16, 7, 7, 16, 7),
                                   (1, 4, 50, 84, 16, 13), (2, 3, 9, 23, 70, 5)])
def test_cuda_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compile for the GPU
    *_, K = shape
    attn, value = _inputs(*shape, dtype=torch.float32)
    ref = _run(attn, value, K, "reference")
    assert _op.resolve("auto", value.cuda().to(dtype)) == "triton"
    got = _run(attn.cuda().to(dtype), value.cuda().to(dtype), K, "auto")
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for o, r in zip(got, ref):
        assert o.dtype == dtype and o.is_cuda
        torch.testing.assert_close(o.float().cpu(), r, rtol=tol, atol=tol)
