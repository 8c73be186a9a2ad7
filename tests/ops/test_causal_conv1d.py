"""causal_conv1d: every backend against the F.conv1d reference (outputs, gradients, layouts, FLOPs)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.causal_conv1d import _cpu, causal_conv1d

from ._threads import at_thread_counts

BACKENDS = ["reference", "shifted"] + (["cpu"] if _cpu.load() is not None else [])


def _naive(x, w, b, act):
    # out[t] = b + sum_k w[k] * x[t - (K-1) + k], written as a loop over taps (float64 yardstick)
    B, C, L = x.shape
    K = w.shape[1]
    out = torch.zeros(B, C, L, dtype=torch.float64) + (0 if b is None else b.double()[:, None])
    for k in range(K):
        shift = K - 1 - k
        out[..., shift:] += w.double()[:, k, None] * x.double()[..., : L - shift]
    return torch.nn.functional.silu(out) if act == "silu" else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L", [1, 3, 4, 17])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("time_major", [True, False])
def test_matches_naive_and_reference_gradients(backend, L, act, with_bias, time_major):
    B, C, K = 2, 11, 4  # 11 channels: one full block of 8 for the cpu kernel and a ragged one
    x = torch.randn(B, L, C).transpose(1, 2) if time_major else torch.randn(B, C, L)
    x.requires_grad_(True)
    w = torch.randn(C, K, requires_grad=True)
    b = torch.randn(C, requires_grad=True) if with_bias else None
    out = causal_conv1d(x, w, b, act, backend=backend)
    torch.testing.assert_close(out.double(), _naive(x, w, b, act), rtol=1e-5, atol=1e-5)
    if backend in ("shifted", "cpu") and time_major:
        assert out.transpose(1, 2).is_contiguous()  # keeps the time-major layout
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], g)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    ref = causal_conv1d(*ref_inputs, *([] if with_bias else [None]), act, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_inputs, g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C compiler on this machine")
@pytest.mark.parametrize("K", [1, 2, 4, 16])
def test_cpu_kernel_filter_lengths_and_fallbacks(K):
    x, w, b = torch.randn(3, 20, 19), torch.randn(20, K), torch.randn(20)
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu", backend="cpu").double(), _naive(x, w, b, "silu"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="K <= 16"):
        causal_conv1d(x, torch.randn(20, 17), backend="cpu")
    long = torch.randn(20, 17)  # auto takes shifted for what the kernel cannot do
    torch.testing.assert_close(causal_conv1d(x, long).double(), _naive(x, long, None, None), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fp32 inputs"):
        causal_conv1d(x.double(), w.double(), backend="cpu")


def test_gradcheck_shifted():
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a, "silu", backend="shifted"), (x, w, b))


def test_conv1d_weight_layout_and_bf16():
    x = torch.randn(1, 4, 9)
    w3 = torch.randn(4, 1, 3)
    torch.testing.assert_close(causal_conv1d(x, w3), causal_conv1d(x, w3[:, 0], backend="reference"))
    out = causal_conv1d(x.bfloat16(), w3, torch.randn(4), "silu")
    assert out.dtype == torch.bfloat16


def test_flops_and_meta():
    with torch.device("meta"):
        x, w = torch.empty(2, 8, 50), torch.empty(8, 4)
    counter = FlopCounterMode(display=False)
    with counter:
        out = causal_conv1d(x, w, None, "silu")
    assert out.shape == (2, 8, 50)
    assert counter.get_total_flops() == 2 * 2 * 8 * 50 * 4


def test_bad_inputs_and_backends(monkeypatch):
    x, w = torch.randn(1, 4, 9), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight must be \(dim, K\) with dim=4"):
        causal_conv1d(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"x must be \(batch, dim, L\)"):
        causal_conv1d(x[0], w)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here: not available on device type 'cpu'"):
        causal_conv1d(x, w, backend="cuda")
    monkeypatch.setenv("VISIONZOO_BACKEND_CAUSAL_CONV1D", "bogus")
    with pytest.raises(ValueError, match="VISIONZOO_BACKEND_CAUSAL_CONV1D"):
        causal_conv1d(x, w)


@pytest.mark.cuda
def test_cuda_backends_match_reference():
    x = torch.randn(2, 64, 197, device="cuda")
    w, b = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    ref = causal_conv1d(x, w, b, "silu", backend="reference")
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu"), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(causal_conv1d(x, w, b, "silu", backend="shifted"), ref, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, w, b = torch.randn(2, 5, 7), torch.randn(5, 4), torch.randn(5)
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.visionzoo.causal_conv1d, (x, w, b, "silu", backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time_major", [True, False])
@pytest.mark.parametrize("L", [1, 5, 18])
def test_bidirectional_matches_flipped_composition(backend, time_major, L):
    """cat([conv(x, w_f), conv(flip(x), w_b)]) with x read backwards in place (cpu) or composed."""
    from visionzoo.ops.causal_conv1d import causal_conv1d_bidirectional

    B, E, K = 2, 11, 4
    base = torch.randn(B, L, 2 * E)  # Vim: x is the first half of in_proj's output, (B, L, E) with stride 2E
    x = (base[..., :E].transpose(1, 2) if time_major else base[..., :E].permute(0, 2, 1).contiguous())
    x = x.detach().requires_grad_(True)
    w, b = torch.randn(2 * E, K, requires_grad=True), torch.randn(2 * E, requires_grad=True)
    out = causal_conv1d_bidirectional(x, w, b, "silu", backend=backend)
    expected = torch.cat([_naive(x, w[:E], b[:E], "silu"), _naive(x.flip(-1), w[E:], b[E:], "silu")], dim=1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.stride(1) == 1 if time_major else out.is_contiguous()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    ref = causal_conv1d(torch.cat([leaves[0], leaves[0].flip(-1)], 1), leaves[1], leaves[2], "silu",
                        backend="reference")
    for a, r in zip(grads, torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_bidirectional_opcheck_flops_and_errors():
    from visionzoo.ops.causal_conv1d import causal_conv1d_bidirectional

    x, w, b = torch.randn(2, 5, 7), torch.randn(10, 4), torch.randn(10)
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.visionzoo.causal_conv1d_bidirectional, (x, w, b, "silu", backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with torch.device("meta"):
        xm, wm = torch.empty(2, 8, 50), torch.empty(16, 4)
    counter = FlopCounterMode(display=False)
    with counter:
        assert causal_conv1d_bidirectional(xm, wm).shape == (2, 16, 50)
    assert counter.get_total_flops() == 2 * 2 * 16 * 50 * 4
    with pytest.raises(ValueError, match=r"weight must be \(2E, K\) with 2E=10"):
        causal_conv1d_bidirectional(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"bias must be \(10,\)"):
        causal_conv1d_bidirectional(x, w, torch.randn(5))


@pytest.mark.skipif(_cpu.load() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("time_major", [True, False])
def test_cpu_backward_kernel_matches_shifted_and_any_thread_count(time_major):
    """The C backward (dx, dw, dbias; both directions, the second read and written backwards in place) against
    autograd through ``shifted``, and bitwise the same on 1 and 2 threads (dw, dbias: one thread sums a channel)."""
    from visionzoo.ops.causal_conv1d._op import _both_directions
    from visionzoo.ops.causal_conv1d._shifted import causal_conv1d_shifted

    torch.manual_seed(0)
    B, E, L, K = 3, 21, 40, 4
    x = torch.randn(B, L, E).transpose(1, 2) if time_major else torch.randn(B, E, L)
    w, b, g = torch.randn(2 * E, K), torch.randn(2 * E), torch.randn(B, 2 * E, L)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = torch.autograd.grad(causal_conv1d_shifted(_both_directions(leaves[0]), leaves[1], leaves[2], "silu"),
                              leaves, g)
    got = at_thread_counts(
        lambda: _cpu.causal_conv1d_cpu_backward(x, w, b, "silu", g, (True, True, True), bidirectional=True), (1, 2))
    for a, a2, r in zip(got[0], got[1], ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, a2)
    assert got[0][0].stride() == x.stride() or not time_major  # dx keeps the time-major layout


@pytest.mark.skipif(_cpu.load() is None, reason="no C compiler for the cpu kernels")
def test_both_vector_widths_give_the_same_bits(monkeypatch, tmp_path):
    """The C conv is 16 lanes wide where the build targets AVX-512, else 8: lanes never mix, so a build without
    AVX-512 gives bitwise the same forward and backward (checked on whatever this machine builds by default)."""
    from visionzoo.ops import _cpu_build

    torch.manual_seed(1)
    B, E, L, K = 2, 37, 29, 4  # 37 channels: whole blocks of either width and a ragged one
    x, w, b, g = torch.randn(B, L, E).transpose(1, 2), torch.randn(2 * E, K), torch.randn(2 * E), torch.randn(B, 2 * E, L)

    def both():
        fwd = _cpu.causal_conv1d_bidirectional_cpu(x, w, b, "silu", torch.empty(B, 2 * E, L))
        return (fwd, *_cpu.causal_conv1d_cpu_backward(x, w, b, "silu", g, (True, True, True), bidirectional=True))

    default = both()
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "FLAGS", _cpu_build.FLAGS + ("-mno-avx512f",))
    _cpu_build.forget(_cpu.OP)
    try:
        narrow = both()
    finally:
        _cpu_build.forget(_cpu.OP)
    for a, n in zip(default, narrow):
        assert torch.equal(a, n)
