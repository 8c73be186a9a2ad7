"""The ``cpu`` selective-scan backend (C kernel compiled on first use) against ``reference``."""
import itertools
import logging

import pytest
import torch

from visionzoo.ops import _cpu_build
from visionzoo.ops.selective_scan import _cpu, _op, selective_scan

from ._threads import at_thread_counts
from .test_selective_scan import ENV, assert_close, make_inputs, run

needs_kernel = pytest.mark.skipif(_cpu.load() is None, reason="no C compiler on this machine")


@needs_kernel
@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=4)))
def test_all_option_combinations(opts):
    D, z, bias, softplus = opts
    x = make_inputs(length=21, groups=3, dim=6, D=D, z=z, bias=bias, seed=3)
    out_r, last_r, g_r = run(x, "reference", softplus, grads=True)
    out_c, last_c, g_c = run(x, "cpu", softplus, grads=True)
    assert out_c.dtype == torch.float32 and last_c.shape == last_r.shape
    assert_close(out_c, out_r, 2e-6, "out")
    assert_close(last_c, last_r, 2e-6, "last_state")
    for name in g_r:  # the backward is the C one (_cpu_bwd); checked here through the op's autograd
        assert_close(g_c[name], g_r[name], 1e-5, f"grad {name}")


@needs_kernel
@pytest.mark.parametrize("dim,groups,dstate", [(48, 1, 16), (40, 2, 16), (34, 2, 5), (18, 3, 1), (96, 2, 64)])
@pytest.mark.parametrize("length", [1, 17, 70])
def test_channel_blocks_and_groups(dim, groups, dstate, length):
    """Blocks of 8 channels: whole blocks per group, blocks straddling groups, ragged last block."""
    x = make_inputs(batch=3, dim=dim, length=length, dstate=dstate, groups=groups, seed=dim + length)
    out_r, last_r, _ = run(x, "reference")
    out_c, last_c, _ = run(x, "cpu")
    assert_close(out_c, out_r, 2e-6, "out")
    assert_close(last_c, last_r, 2e-6, "last_state")


@needs_kernel
def test_time_major_views_and_threads(monkeypatch):
    """Vim passes (b, d, L) views of (b, L, d) memory; out keeps that layout. Several threads agree with one."""
    x = make_inputs(batch=2, dim=40, length=19, groups=2, seed=7)
    tm = {k: (v.permute(2, 0, 1).contiguous().permute(1, 2, 0) if k in ("u", "delta", "z") else v)
          for k, v in x.items()}
    bl = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
          for k, v in x.items()}
    out_r, _, _ = run(x, "reference")
    out_tm, _, _ = run(tm, "cpu")
    assert out_tm.permute(2, 0, 1).is_contiguous()
    assert_close(out_tm, out_r, 2e-6, "time-major")
    out_bl, _, _ = run(bl, "cpu")  # (b, L, d) memory: strided reads, contiguous out
    assert_close(out_bl, out_r, 2e-6, "(b, L, d)")
    for out_n, last_n, _ in at_thread_counts(lambda: run(x, "cpu"), (1, 3)):
        torch.testing.assert_close(out_n, out_bl.contiguous(), rtol=0, atol=0)


@needs_kernel
def test_extreme_decay_and_softplus_range():
    """delta A down to -300 per step (exp underflows to 0) and softplus inputs from -40 to +40."""
    x = make_inputs(batch=1, dim=16, length=30, dstate=4, seed=11)
    x["delta"] = torch.linspace(-40, 40, 30).expand(1, 16, 30).contiguous()
    x["A"] = -torch.linspace(0.01, 7.5, 64).reshape(16, 4)
    out_r, last_r, _ = run(x, "reference")
    out_c, last_c, _ = run(x, "cpu")
    assert torch.isfinite(out_c).all()
    assert_close(out_c, out_r, 2e-6, "out")
    assert_close(last_c, last_r, 2e-6, "last_state")


@needs_kernel
def test_other_dtypes_fall_back_to_chunked():
    x = make_inputs(length=5, dtype=torch.float64)
    out_auto, _, _ = run(x, "auto")
    assert out_auto.dtype == torch.float64
    with pytest.raises(RuntimeError, match="does not support dtype torch.float64"):
        selective_scan(**x, backend="cpu")


@needs_kernel
def test_state_size_limit_is_a_clear_error():
    x = make_inputs(length=3, dim=4, dstate=_cpu.NMAX + 1)
    with pytest.raises(RuntimeError, match=f"N <= {_cpu.NMAX}"):
        selective_scan(**x, backend="cpu")


def test_build_cache_and_unavailable_compiler(monkeypatch, tmp_path, caplog):
    """The library is built into $VISIONZOO_CACHE once; without a compiler the backend is unavailable."""
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "_libs", {})
    if _cpu_build.compiler() is not None:
        assert _cpu.load() is not None
        built = list((tmp_path / "kernels").glob("selective_scan_*.so"))
        assert len(built) == 1
        _cpu_build.forget(_cpu.OP)
        assert _cpu.load() is not None and list((tmp_path / "kernels").iterdir()) == built  # reused
    _cpu_build.forget(_cpu.OP)
    monkeypatch.setattr(_cpu_build, "compiler", lambda: None)
    monkeypatch.delenv(ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="visionzoo.ops"):
        assert not _op.is_available("cpu", "cpu")
    assert "no C compiler" in caplog.text
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: no C compiler"):
        selective_scan(**make_inputs(length=3), backend="cpu")
    assert _op.resolve("auto", torch.empty(1, 1, 1)) == "chunked"


def test_broken_compiler_or_switch_off_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "_libs", {})
    monkeypatch.setattr(_cpu_build, "compiler", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger="visionzoo.ops"):
        assert _cpu.load() is None
    assert "building the cpu kernel failed" in caplog.text
    _cpu_build.forget(_cpu.OP)
    monkeypatch.setenv("VISIONZOO_CPU_KERNELS", "0")
    assert _cpu.load() is None and not list(tmp_path.glob("kernels/*.so"))


@needs_kernel
@pytest.mark.parametrize("reduce", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("time_major", [True, False])
def test_bidirectional_in_place_path_matches_flipped_copies(reduce, with_z, time_major):
    """Vim's layout on the cpu backend (z read and output written backwards, second direction accumulated)
    against two reference scans on explicitly flipped tensors."""
    from visionzoo.ops.selective_scan import selective_scan_bidirectional
    from visionzoo.ops.selective_scan._reference import selective_scan_reference as ref

    g = torch.Generator().manual_seed(5)
    b, E, L, N = 2, 20, 13, 5  # 20 channels per direction: two blocks of 8 and a ragged one

    def seq(channels):
        x = torch.randn(b, L, channels, generator=g)
        return x.transpose(1, 2) if time_major else x.transpose(1, 2).contiguous()

    u, delta, z = seq(2 * E), seq(2 * E), seq(E) if with_z else None
    A = -torch.rand(2 * E, N, generator=g) * 3
    B, C = torch.randn(b, 2, N, L, generator=g), torch.randn(b, 2, N, L, generator=g)
    D, bias = torch.randn(2 * E, generator=g), torch.randn(2 * E, generator=g)
    out, last = selective_scan_bidirectional(u, delta, A, B, C, D, z, bias, True, True, reduce=reduce,
                                             reversed_inputs=True, backend="cpu")
    f, lf = ref(u[:, :E], delta[:, :E], A[:E], B[:, :1], C[:, :1], D[:E], z, bias[:E], True)
    r, lb = ref(u[:, E:], delta[:, E:], A[E:], B[:, 1:], C[:, 1:], D[E:], None if z is None else z.flip(-1),
                bias[E:], True)
    expected = {"mean": (f + r.flip(-1)) / 2, "sum": f + r.flip(-1), "none": torch.cat([f, r.flip(-1)], 1)}[reduce]
    assert_close(out, expected, 2e-6, "out")
    assert_close(last, torch.cat([lf, lb], 1), 2e-6, "last_state")


@needs_kernel
def test_both_vector_widths_give_the_same_bits(monkeypatch, tmp_path):
    """The kernel is 16 lanes wide where the build targets AVX-512, else 8: the lanes never mix, so a build
    without AVX-512 gives bitwise the same results (checked here on whatever this machine builds by default)."""
    x = make_inputs(batch=2, dim=40, length=45, dstate=16, groups=2, seed=5)
    default = run(x, "cpu", True)
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "FLAGS", _cpu_build.FLAGS + ("-mno-avx512f",))
    _cpu_build.forget(_cpu.OP)
    try:
        narrow = run(x, "cpu", True)
    finally:
        _cpu_build.forget(_cpu.OP)
    for a, b in zip(default[:2], narrow[:2]):
        assert torch.equal(a, b)
