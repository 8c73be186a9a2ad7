"""``visionzoo.ops.rms_norm``: the C kernel against ``F.rms_norm`` (the reference backend), when ``auto`` takes it,
and that it never runs where autograd, tracers or exporters need the aten op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionzoo.ops import aten_only
from visionzoo.ops.rms_norm import NORM, _cpu, rms_norm

from ._threads import at_thread_counts

needs_kernel = pytest.mark.skipif(_cpu.load() is None, reason="no C compiler for the cpu kernels")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 197, 192), (2, 5, 37), (3, 1), (4, 0, 16)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_cpu_kernel_matches_the_reference(shape, with_weight):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g) if with_weight else None
    with torch.no_grad():
        out = rms_norm(x, w, 1e-5, backend="cpu")
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_cpu_kernel_reads_strided_rows_and_any_thread_count_gives_the_same_bits():
    x = torch.randn(3, 40, 96)[:, ::2, :48]  # neither contiguous nor dense rows
    w = torch.randn(48)
    with torch.no_grad():
        outs = at_thread_counts(lambda: rms_norm(x, w, 1e-6, backend="cpu"))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    torch.testing.assert_close(outs[0], F.rms_norm(x, (48,), w, 1e-6), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_auto_takes_the_kernel_only_for_fp32_cpu_inference():
    x, w = torch.randn(2, 8), torch.ones(8)
    with torch.no_grad():
        assert NORM.select("auto", x, weight=w) == "cpu"
        assert NORM.select("auto", x.double(), weight=w.double()) == "reference"
        with aten_only():
            assert NORM.select("auto", x, weight=w) == "reference"
    xg = x.clone().requires_grad_()
    assert NORM.select("auto", xg, weight=w) == "reference"  # autograd needs the aten op
    out = rms_norm(xg, w, 1e-5)
    out.sum().backward()
    assert xg.grad is not None
    with pytest.raises(RuntimeError, match="rms_norm: backend 'cpu' cannot run here: inference only"):
        rms_norm(xg, w, 1e-5, backend="cpu")


def test_traced_and_exported_graphs_hold_the_aten_op():
    class Norm(torch.nn.Module):
        def forward(self, x):
            return rms_norm(x, torch.ones(6), 1e-5)

    with torch.no_grad():
        ep = torch.export.export(Norm(), (torch.randn(2, 6),))
        traced = torch.jit.trace(Norm(), torch.randn(2, 6))
    assert "rms_norm" in str(ep.graph) and "rms_norm" in str(traced.inlined_graph)


def test_bad_weight_shape_is_one_clear_line():
    with pytest.raises(ValueError, match=r"rms_norm: weight must be \(8,\), got \(7,\)"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)


@needs_kernel
def test_bf16_output_is_the_cast_of_the_fp32_result():
    """``out_dtype=torch.bfloat16`` rounds in the kernel to nearest even: the same bits as ``.to(torch.bfloat16)``
    of the fp32 result (NaN stays NaN), and the reference backend casts."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 50, 96, generator=g) * 7, torch.randn(96, generator=g)
    x[1, 3, 5] = float("nan")
    x[2, 0] = 3e38
    with torch.no_grad():
        full = rms_norm(x, w, 1e-5, backend="cpu")
        half = rms_norm(x, w, 1e-5, out_dtype=torch.bfloat16, backend="cpu")
        ref = rms_norm(x, w, 1e-5, out_dtype=torch.bfloat16, backend="reference")
    assert half.dtype == ref.dtype == torch.bfloat16
    cast = full.to(torch.bfloat16)
    finite = ~torch.isnan(cast)
    assert torch.equal(torch.isnan(half), ~finite)
    assert torch.equal(half[finite].view(torch.int16), cast[finite].view(torch.int16))
    torch.testing.assert_close(half.float(), ref.float(), rtol=1e-2, atol=1e-2, equal_nan=True)
