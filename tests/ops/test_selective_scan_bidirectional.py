"""Tests for ``selective_scan_bidirectional`` (both directions of a Vim mixer in one call).

The definition it is tested against: two calls of the ``reference`` scan, the second on the
time-reversed backward half, its output flipped back. ``triton`` runs under ``TRITON_INTERPRET=1``
(see tests/ops/test_selective_scan_triton.py) at tiny sizes; every other backend falls back to two
scans.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.selective_scan import (
    _bidirectional,
    _op,
    _triton,
    selective_scan,
    selective_scan_bidirectional,
    selective_scan_flops,
)

from .test_selective_scan import NAMES, make_inputs

needs_triton = pytest.mark.skipif(not _op.is_available("triton", "cpu"),
                                  reason="needs Triton with TRITON_INTERPRET=1 set before it is imported")
CPU_BACKENDS = ["chunked", "cpu", pytest.param("triton", marks=needs_triton)]


def make_bi(batch=1, dim=4, length=7, dstate=4, groups=2, z="shared", seed=0, **kw):
    """Stacked inputs: 2 * dim channels, G groups (G/2 per direction); z shared (dim channels), stacked or None."""
    x = make_inputs(batch=batch, dim=2 * dim, length=length, dstate=dstate, groups=groups, seed=seed,
                    z=z is not None, **kw)
    if z == "shared":
        x["z"] = x["z"][:, :dim].contiguous()
    return x


def reference_bidirectional(x, delta_softplus=True, reduce="mean"):
    """Two reference scans: forward half; backward half flipped along L, output flipped back."""
    dim = x["u"].shape[1] // 2
    hg = x["B"].shape[1] // 2

    def half(v, i):
        return v[:, i * dim:(i + 1) * dim]

    def flip(v):
        return None if v is None else v.flip(-1)

    z = x["z"]
    z_f = z_b = z
    if z is not None and z.shape[1] == 2 * dim:
        z_f, z_b = z[:, :dim], z[:, dim:]
    out_f, last_f = selective_scan(half(x["u"], 0), half(x["delta"], 0), x["A"][:dim], x["B"][:, :hg], x["C"][:, :hg],
                                   None if x["D"] is None else x["D"][:dim], z_f,
                                   None if x["delta_bias"] is None else x["delta_bias"][:dim],
                                   delta_softplus, True, backend="reference")
    out_b, last_b = selective_scan(flip(half(x["u"], 1)), flip(half(x["delta"], 1)), x["A"][dim:], flip(x["B"][:, hg:]),
                                   flip(x["C"][:, hg:]), None if x["D"] is None else x["D"][dim:], flip(z_b),
                                   None if x["delta_bias"] is None else x["delta_bias"][dim:],
                                   delta_softplus, True, backend="reference")
    out_b = out_b.flip(-1)
    out = {"mean": (out_f + out_b) / 2, "sum": out_f + out_b, "none": torch.cat([out_f, out_b], 1)}[reduce]
    return out, torch.cat([last_f, last_b], 1)


def run_bi(fn, x, seed=1):
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    out, last = fn(leaves)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out)
    w_last = torch.randn(last.shape, generator=g).to(last)
    ((out * w_out).sum() + (last * w_last).sum()).backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def check(x, backend, softplus=True, reduce="mean", rtol=6e-4, atol=2e-3):
    out_r, last_r, g_r = run_bi(lambda lv: reference_bidirectional(lv, softplus, reduce), x)
    out, last, g = run_bi(lambda lv: selective_scan_bidirectional(
        **lv, delta_softplus=softplus, return_last_state=True, reduce=reduce, backend=backend), x)
    assert out.shape == out_r.shape and out.dtype == x["u"].dtype
    assert last.shape == last_r.shape and last.dtype == torch.float32
    torch.testing.assert_close(out, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_r, rtol=rtol, atol=atol)
    assert set(g) == set(g_r)
    for name in g_r:
        assert g[name].shape == x[name].shape, name
        torch.testing.assert_close(g[name], g_r[name], rtol=rtol, atol=atol, msg=f"grad {name}")
    return out


def available(backend):
    if not _op.is_available(backend, "cpu"):
        pytest.skip(f"backend {backend!r} not available here")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("z,reduce", [("shared", "mean"), ("stacked", "none"), (None, "sum")])
def test_matches_two_reference_scans(backend, z, reduce):
    available(backend)
    x = make_bi(batch=2 if backend != "triton" else 1, dim=4, length=9, dstate=4, z=z, seed=1)
    check(x, backend, reduce=reduce)


def reverse_backward_half(x):
    """The inputs as ``reversed_inputs=True`` takes them: backward half of u, delta, B, C (and a stacked z) flipped."""
    dim = x["u"].shape[1] // 2
    hg = x["B"].shape[1] // 2
    y = dict(x)
    for k, half in (("u", dim), ("delta", dim), ("B", hg), ("C", hg), ("z", dim)):
        v = x[k]
        if v is None or (k == "z" and v.shape[1] == dim):
            continue
        y[k] = torch.cat([v[:, :half], v[:, half:].flip(-1)], dim=1)
    return y


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("z,reduce", [("shared", "mean"), ("stacked", "none")])
def test_reversed_inputs(backend, z, reduce):
    """Backward-direction inputs given time-reversed (Vim's layout): same result as the definition."""
    available(backend)
    x = make_bi(dim=4, length=7, dstate=4, z=z, seed=9)
    out_r, last_r, g_r = run_bi(lambda lv: reference_bidirectional(lv, True, reduce), x)
    out, last, g = run_bi(lambda lv: selective_scan_bidirectional(
        **reverse_backward_half(lv), delta_softplus=True, return_last_state=True, reduce=reduce,
        reversed_inputs=True, backend=backend), x)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_r, rtol=6e-4, atol=2e-3)
    for name in g_r:
        torch.testing.assert_close(g[name], g_r[name], rtol=6e-4, atol=2e-3, msg=f"grad {name}")


@pytest.mark.parametrize("dim,length,dstate,groups", [
    (4, 5, 4, 2),
    (3, 17, 5, 2),  # odd dim, N not a power of two, two checkpoint chunks in the Triton backward
    (4, 6, 8, 4),  # two groups per direction
    pytest.param(8, 33, 16, 2, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes(backend, dim, length, dstate, groups):
    available(backend)
    x = make_bi(dim=dim, length=length, dstate=dstate, groups=groups, seed=dim * length)
    check(x, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_optional_inputs(backend):
    available(backend)
    x = make_bi(length=5, z=None, D=False, bias=False, seed=3)
    check(x, backend, softplus=False)


@pytest.mark.parametrize("backend", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_time_major_views(backend):
    """Vim's layout: (B, C, L) views of (B, L, C) activations; the output keeps it."""
    x = make_bi(length=6, seed=4)
    for k in ("u", "delta", "z"):
        x[k] = x[k].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out = check(x, backend)
    assert out.permute(2, 0, 1).is_contiguous()


@needs_triton
def test_triton_is_one_launch_without_flipped_copies(monkeypatch):
    """One forward and one backward kernel launch for both directions; no flipped inputs are made."""
    launches = []
    real = _triton._kernel

    def counting(device_type, name="selective_scan_fwd_kernel"):
        launches.append(name)
        return real(device_type, name)

    monkeypatch.setattr(_triton, "_kernel", counting)
    monkeypatch.setattr(_bidirectional, "_scan_order", None)  # the plain-scan fallback must not run
    real_flip = torch.Tensor.flip

    def no_flip(self, *a, **k):
        raise AssertionError("flip() called in the fused path")

    x = make_bi(length=5, seed=5)
    for reversed_inputs in (False, True):
        leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        monkeypatch.setattr(torch.Tensor, "flip", no_flip)
        out = selective_scan_bidirectional(**leaves, delta_softplus=True, reversed_inputs=reversed_inputs,
                                           backend="triton")
        out.sum().backward()
        monkeypatch.setattr(torch.Tensor, "flip", real_flip)
    assert launches == ["selective_scan_fwd_kernel", "selective_scan_bwd_kernel"] * 2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    x = make_bi(length=5, seed=6)
    xl = {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    out_r, last_r, g_r = run_bi(lambda lv: reference_bidirectional(lv), {k: v.float() for k, v in xl.items()})
    out, last, g = run_bi(lambda lv: selective_scan_bidirectional(**lv, delta_softplus=True, return_last_state=True,
                                                                  backend="triton"), xl)
    assert out.dtype == dtype and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), out_r, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(last, last_r, rtol=1e-4, atol=1e-4)
    for name in g_r:
        assert g[name].dtype == xl[name].dtype
        torch.testing.assert_close(g[name].float(), g_r[name], rtol=3e-2, atol=3e-2)


BAD = [
    (lambda x: x.update(u=x["u"][:, :-1], delta=x["delta"][:, :-1]), "odd channel count 7"),
    (lambda x: x.update(z=x["z"][:, :3]), r"z has shape \(1, 3, 7\); expected \(1, 4, 7\)"),
    (lambda x: x.update(B=x["B"][:, :1], C=x["C"][:, :1]), r"even number of groups G \(.*got G=1"),
    (lambda x: x.update(A=x["A"][:4]), r"A must be \(dim, N\) with dim=8"),
    (lambda x: x.update(z=x["z"].to("meta")), "z is on meta"),
    (lambda x: x.update(z=x["z"].long()), "z must be a real floating point tensor"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_bad_inputs(mutate, message):
    x = make_bi()
    mutate(x)
    with pytest.raises(ValueError, match=message):
        selective_scan_bidirectional(**x)


def test_bad_reduce_and_backend():
    x = make_bi()
    with pytest.raises(ValueError, match="reduce must be one of"):
        selective_scan_bidirectional(**x, reduce="max")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        selective_scan_bidirectional(**x, backend="cuda")


def test_meta_device_and_flops():
    x = make_bi(batch=2, dim=4, length=9, dstate=5, groups=2)
    xm = {k: v.to("meta") for k, v in x.items()}
    out, last = selective_scan_bidirectional(**xm, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 4, 9) and out.device.type == "meta" and last.shape == (2, 8, 5)
    assert selective_scan_bidirectional(**xm, reduce="none").shape == (2, 8, 9)
    with FlopCounterMode(display=False) as counter:
        selective_scan_bidirectional(**x, delta_softplus=True, reduce="mean", backend="chunked")
    # the two scans (as one scan of 2 * dim channels); the average of the outputs is elementwise, not counted
    assert counter.get_total_flops() == selective_scan_flops(2, 8, 9, 5, True, True)


def test_opcheck():
    x = make_bi(length=5)
    args = tuple(x[k] for k in NAMES)
    torch.library.opcheck(torch.ops.visionzoo.selective_scan_bidirectional, (*args, True, "mean", False, "chunked"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.slow  # ~30 s of cold torch.compile on a loaded 2-core machine
def test_compile_fullgraph():
    x = make_bi(length=5)
    args = tuple(x[k] for k in NAMES)
    torch._dynamo.reset()

    def f(*a):
        return selective_scan_bidirectional(*a, delta_softplus=True, backend="chunked")

    leaves = [a.clone().requires_grad_() for a in args]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    out.sum().backward()
    leaves_e = [a.clone().requires_grad_() for a in args]
    out_e = f(*leaves_e)
    out_e.sum().backward()
    torch.testing.assert_close(out, out_e)
    for a, b in zip(leaves, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = make_bi(batch=2, dim=64, length=70, dstate=16, groups=2, seed=7)
    out_r, last_r, g_r = run_bi(lambda lv: reference_bidirectional(lv), x)
    xc = {k: (v.cuda().to(dtype) if k in ("u", "delta", "z", "B", "C") else v.cuda()) for k, v in x.items()}
    out, last, g = run_bi(lambda lv: selective_scan_bidirectional(**lv, delta_softplus=True, return_last_state=True,
                                                                  backend="triton"), xc)
    tol = 6e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), out_r, rtol=tol, atol=max(tol, 2e-3))
    torch.testing.assert_close(last.cpu(), last_r, rtol=tol, atol=max(tol, 2e-3))
    for name in g_r:
        torch.testing.assert_close(g[name].float().cpu(), g_r[name], rtol=10 * tol, atol=10 * max(tol, 2e-3))
