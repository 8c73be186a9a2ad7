"""``vim_blocks_cpu``: whole Vim blocks (RMSNorm -> in_proj -> fused mixer -> out_proj -> residual add) in one C
call, against the same blocks composed from the public ops; its argument cache; ``torch_blas``; and
``vim_blocks_cpu_applies``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from visionzoo.ops.rms_norm import rms_norm
from visionzoo.ops.selective_scan import (
    VimBlockWeights,
    _cpu,
    bimamba_inner_cpu,
    torch_blas,
    vim_blocks_cpu,
    vim_blocks_cpu_applies,
)

from ._threads import at_thread_counts
from .test_bimamba_inner_cpu import make_direction

needs_kernel = pytest.mark.skipif(not _cpu.is_available("cpu") or torch_blas() is None,
                                  reason="no C compiler for the cpu kernels, or no MKL packed GEMM in torch")


def make_layer(D, E, N, R, K, g, conv_bias=True):
    return VimBlockWeights(norm_weight=1 + 0.2 * torch.randn(D, generator=g), eps=1e-5,
                           in_proj_weight=torch.randn(2 * E, D, generator=g) * D ** -0.5,
                           out_proj_weight=torch.randn(D, E, generator=g) * E ** -0.5,
                           forward=make_direction(E, N, R, K, conv_bias, g),
                           backward=make_direction(E, N, R, K, conv_bias, g))


def blocks_op_by_op(x, layers, norm_backend="cpu"):
    """The definition, one public op at a time (the C norm by default: the one the fused call uses)."""
    with torch.no_grad():
        for w in layers:
            h = rms_norm(x, w.norm_weight, w.eps, backend=norm_backend)
            y = bimamba_inner_cpu(F.linear(h, w.in_proj_weight), w.forward, w.backward)
            x = x + F.linear(y, w.out_proj_weight)
    return x


class Owner:
    """Anything weak-referenceable owns a cached plan (models pass themselves)."""


def close(a, b):
    """Within fp32 rounding (see test_matches_the_blocks_op_by_op); a stale cached weight is far off."""
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@needs_kernel
@pytest.mark.parametrize("batch,L,D,E,N,R,depth,conv_bias", [
    (1, 197, 24, 48, 16, 3, 3, True),   # Vim's N, an odd number of layers (the last writes out directly)
    (2, 67, 16, 32, 16, 2, 2, False),   # batch 2, an even number of layers, no conv bias
    (1, 5, 8, 20, 5, 4, 1, True),       # E = 20: ragged channel blocks; one layer
])
def test_matches_the_blocks_op_by_op(batch, L, D, E, N, R, depth, conv_bias):
    g = torch.Generator().manual_seed(0)
    layers = [make_layer(D, E, N, R, 4, g, conv_bias) for _ in range(depth)]
    x = torch.randn(batch, L, D, generator=g)
    owner = Owner()

    def both():
        with torch.no_grad():
            return vim_blocks_cpu(x, layers, owner), blocks_op_by_op(x, layers)

    for out, expected in at_thread_counts(both):
        # The same kernels as the op-by-op blocks; the projections are MKL's packed GEMM there and F.linear's MKL
        # call here: bitwise on the Xeon this was written on, but on an AMD Zen 5 MKL rounds some of these shapes
        # (and any shape at 3 threads on 2 cores) differently in the last bit, so: within fp32 rounding.
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)
    # and within 1e-5 of the blocks with torch's own RMSNorm (its sum of squares adds in another order)
    with torch.no_grad():
        torch.testing.assert_close(vim_blocks_cpu(x, layers, owner), blocks_op_by_op(x, layers, "reference"),
                                   rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_cached_arguments_follow_the_weights_and_the_input():
    g = torch.Generator().manual_seed(1)
    layers = [make_layer(16, 32, 16, 2, 4, g) for _ in range(2)]
    owner = Owner()
    x = torch.randn(1, 40, 16, generator=g)
    with torch.no_grad():
        vim_blocks_cpu(x, layers, owner)
        layers[1].in_proj_weight.mul_(1.5)  # in place (as load_state_dict does): same pointer, new version
        layers[0].forward.A_log.add_(0.3)
        close(vim_blocks_cpu(x, layers, owner), blocks_op_by_op(x, layers))
        longer = torch.randn(2, 77, 16, generator=g)  # another size: new scratch memory and jobs
        close(vim_blocks_cpu(longer, layers, owner), blocks_op_by_op(longer, layers))
        swapped = [layers[0]._replace(out_proj_weight=layers[0].out_proj_weight.clone() * 0.5), layers[1]]
        close(vim_blocks_cpu(x, swapped, owner), blocks_op_by_op(x, swapped))
    copy.deepcopy(owner)  # the cache holds the owner weakly: copies carry nothing


@needs_kernel
def test_an_empty_batch_gives_an_empty_output():
    layers = [make_layer(16, 32, 16, 2, 4, torch.Generator().manual_seed(4))]
    with torch.no_grad():
        assert vim_blocks_cpu(torch.randn(0, 7, 16), layers, Owner()).shape == (0, 7, 16)


@needs_kernel
def test_bad_layers_give_one_clear_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 10, 16, generator=g)
    good = make_layer(16, 32, 16, 2, 4, g)
    with pytest.raises(ValueError, match="every layer must have the first one's E, N and R"):
        vim_blocks_cpu(x, [good, make_layer(16, 24, 16, 2, 4, g)], Owner())
    with pytest.raises(ValueError, match=r"in_proj and out_proj weights of shapes .*expected \(16,\), \(64, 16\)"):
        vim_blocks_cpu(x, [good._replace(in_proj_weight=torch.randn(64, 12))], Owner())


def test_packed_weights_compute_linear(monkeypatch):
    """MKL's packed GEMM gives F.linear's product: bitwise on the Xeon this was written on and, for these shapes,
    on an AMD Zen 5 too; asserted within fp32 rounding, as MKL may round other CPUs' kernels differently."""
    monkeypatch.setattr(_cpu, "_BLAS", [])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the first caller's context does not matter
        if torch_blas() is None:
            pytest.skip("this torch build has no MKL packed GEMM that F.linear uses")
    assert torch_blas() is torch_blas()  # found once
    g = torch.Generator().manual_seed(3)
    for rows, M, K, ldx in ((197, 768, 192, 192), (197, 192, 384, 768), (5, 20, 8, 8)):
        x = torch.randn(rows, ldx, generator=g)[:, :K]  # a row stride past K, as the out-projection reads y
        w = torch.randn(M, K, generator=g)
        out, packed = torch.empty(rows, M), _cpu.pack_weight(w, rows)
        torch_blas().compute(_cpu._CB_ROW_MAJOR, _cpu._CB_NO_TRANS, _cpu._CB_PACKED, rows, M, K, x.data_ptr(), ldx,
                             packed.data_ptr(), K, 0.0, out.data_ptr(), M)
        torch.testing.assert_close(out, F.linear(x, w), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_applies_only_to_fp32_cpu_inference(monkeypatch):
    x = torch.randn(1, 8, 16)
    assert not vim_blocks_cpu_applies(x)  # autograd on
    with torch.no_grad():
        assert vim_blocks_cpu_applies(x)
        assert not vim_blocks_cpu_applies(x, "chunked")  # blocks pinned to another scan backend
        assert not vim_blocks_cpu_applies(x.double()) and not vim_blocks_cpu_applies(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the blocks keep fp32 under autocast
            assert vim_blocks_cpu_applies(x) and vim_blocks_cpu_applies(x.bfloat16())
        monkeypatch.setenv("VISIONZOO_BACKEND_RMS_NORM", "reference")  # the norm's C kernel switched off
        assert not vim_blocks_cpu_applies(x)
