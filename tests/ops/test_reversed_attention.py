"""Tests for visionzoo.ops.reversed_attention: both backends against a dense computation written
directly from the paper's equations (outputs, gradients, dependency map, mass), FLOPs, memory, errors."""
from __future__ import annotations


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.utils.memory import PeakLiveBytes
from visionzoo.ops.reversed_attention import BACKENDS, resolve, reversed_attention, reversed_attention_flops

ENV = "VISIONZOO_BACKEND_REVERSED_ATTENTION"


def paper_dense(q, k, v, p, m, scale):
    """DependencyViT §3, element by element in float64: A^F = softmax_j(q_i k_j scale),
    A^R[h, j, i] = A^F[h, i, j] p[h, i] m[i], out_j = sum_i A^R[h, j, i] v_i, A^M = sum_h A^R."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    forward_attn = torch.exp(logits - logits.logsumexp(dim=-1, keepdim=True))  # rows i sum to 1 over j
    gate = torch.ones(q.shape[:3], dtype=torch.float64)
    if p is not None:
        gate = gate * p.double()
    if m is not None:
        gate = gate * m.double()[:, None, :]
    reversed_attn = torch.einsum("bhij,bhi->bhji", forward_attn, gate)
    out = torch.einsum("bhji,bhid->bhjd", reversed_attn, v)
    dependency = reversed_attn.sum(dim=1)
    return out, dependency, dependency.sum(dim=-1)


def make_inputs(B=2, H=3, N=37, D=8, Dv=None, dtype=torch.float32, p=True, m=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    pw = (torch.randn(B, H, N, generator=g, dtype=torch.float64) / 0.3).softmax(dim=1) if p else None
    mw = torch.rand(B, N, generator=g, dtype=torch.float64) if m else None
    return [x.to(dtype).requires_grad_() if x is not None else None for x in (q, k, v, pw, mw)]


def _grads(out, inputs):
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    leaves = [x for x in inputs if x is not None]
    return torch.autograd.grad((out.double() * weights).sum(), leaves)


SHAPES = [
    dict(B=2, H=3, N=37, D=8),
    dict(B=1, H=12, N=50, D=16, Dv=4),
    dict(B=3, H=2, N=1, D=5),
    dict(B=2, H=4, N=17, D=8, p=False),
    dict(B=2, H=4, N=17, D=8, m=False),
    dict(B=1, H=2, N=23, D=4, p=False, m=False),
]


@pytest.mark.parametrize("backend,chunk_size", [("reference", None), ("chunked", None), ("chunked", 7)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_matches_paper_equations_fp32(backend, chunk_size, shape):
    inputs = make_inputs(**shape)
    q, k, v, p, m = inputs
    scale = q.shape[-1] ** -0.5
    out, dep, mass = reversed_attention(q, k, v, p, m, backend=backend, chunk_size=chunk_size,
                                        return_dependency=True, return_mass=True)
    ref_out, ref_dep, ref_mass = paper_dense(q, k, v, p, m, scale)
    tol = dict(rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(dep.double(), ref_dep, **tol)
    torch.testing.assert_close(mass.double(), ref_mass, **tol)
    assert not dep.requires_grad and not mass.requires_grad
    for g, g_ref in zip(_grads(out, inputs), _grads(ref_out, inputs)):
        torch.testing.assert_close(g.double(), g_ref.double(), **tol)


@pytest.mark.parametrize("chunk_size", [3, 16, 64])
def test_chunked_equals_reference_fp64_tight(chunk_size):
    inputs = make_inputs(B=2, H=3, N=41, D=6, dtype=torch.float64, seed=3)
    ref = reversed_attention(*inputs, backend="reference")
    out = reversed_attention(*inputs, backend="chunked", chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_chunked_gradcheck():
    inputs = make_inputs(B=1, H=2, N=9, D=3, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(
        lambda *x: reversed_attention(*x, backend="chunked", chunk_size=4), tuple(inputs))


def test_partial_requires_grad_and_unused_output():
    q, k, v, p, m = make_inputs()
    k2 = k.detach()
    out = reversed_attention(q, k2, v.detach(), p.detach(), m, backend="chunked", chunk_size=5)
    gq, gm = torch.autograd.grad(out.sum(), (q, m))
    ref = reversed_attention(q, k2, v.detach(), p.detach(), m, backend="reference")
    rq, rm = torch.autograd.grad(ref.sum(), (q, m))
    torch.testing.assert_close(gq, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm, rm, rtol=1e-5, atol=1e-5)


def test_dependency_columns_sum_to_message():
    """Each child sends all it has: sum over parents of what child i sends = sum_h p[h, i] m[i] = m[i]."""
    q, k, v, p, m = make_inputs()
    _, dep, _ = reversed_attention(q, k, v, p, m, return_dependency=True)
    torch.testing.assert_close(dep.sum(dim=1), m.detach(), rtol=1e-5, atol=1e-6)


def test_bfloat16_runs_close():
    q, k, v, p, m = make_inputs(dtype=torch.bfloat16)
    out = reversed_attention(q, k, v, p, m, backend="chunked", chunk_size=8)
    ref, _, _ = paper_dense(q, k, v, p, m, q.shape[-1] ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flops_counted(backend):
    q, k, v, p, m = make_inputs(B=2, H=3, N=40, D=8, Dv=4)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        reversed_attention(q, k, v, p, m, backend=backend, chunk_size=16)
    assert counter.get_total_flops() == reversed_attention_flops(2, 3, 40, 8, 4)


def test_meta_device():
    q, k, v = (torch.empty(2, 3, 50, 8, device="meta") for _ in range(3))
    out = reversed_attention(q, k, v, torch.empty(2, 3, 50, device="meta"), torch.empty(2, 50, device="meta"))
    assert out.shape == (2, 3, 50, 8) and out.device.type == "meta"


def test_dropout_uses_reference_and_chunked_refuses():
    q, k, v, p, m = make_inputs()
    assert resolve("auto", q, dropout_p=0.1) == "reference"
    assert resolve("auto", q) == "chunked"
    out = reversed_attention(q, k, v, p, m, dropout_p=0.5)
    assert out.shape == q.shape
    with pytest.raises(RuntimeError, match="backend .chunked. cannot run here: it has no attention dropout"):
        reversed_attention(q, k, v, p, m, dropout_p=0.5, backend="chunked")


def test_env_override(monkeypatch):
    q, k, v, p, m = make_inputs()
    monkeypatch.setenv(ENV, "reference")
    assert resolve("auto", q) == "reference"
    assert resolve("chunked", q) == "chunked"  # an explicit request wins
    monkeypatch.setenv(ENV, "nope")
    with pytest.raises(ValueError, match=ENV):
        resolve("auto", q)


@pytest.mark.parametrize("bad", [
    dict(k=torch.randn(2, 3, 36, 8)),
    dict(v=torch.randn(2, 3, 36, 8)),
    dict(p=torch.randn(2, 3, 36)),
    dict(m=torch.randn(2, 3, 37)),
    dict(q=torch.randn(3, 37, 8)),
])
def test_bad_shapes_raise(bad):
    args = dict(zip("qkvpm", make_inputs()))
    args.update(bad)
    with pytest.raises(ValueError):
        reversed_attention(args["q"], args["k"], args["v"], args["p"], args["m"])


def test_bad_arguments_raise():
    q, k, v, p, m = make_inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        reversed_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="chunk_size"):
        reversed_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="floating"):
        reversed_attention(q, k, v.long())


def test_chunked_peak_memory_is_a_fraction_of_dense():
    peaks = {}
    for backend in BACKENDS:
        q, k, v, p, m = make_inputs(B=1, H=4, N=512, D=8, seed=2)
        with PeakLiveBytes() as tracker:
            reversed_attention(q, k, v, p, m, backend=backend, chunk_size=64).sum().backward()
        peaks[backend] = tracker.peak
    assert peaks["chunked"] <= 0.5 * peaks["reference"], peaks
