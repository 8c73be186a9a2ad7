"""``bimamba_inner_cpu``: the C inference path of a Vim mixer (conv -> x_proj -> scan with dt_proj folded
in, both directions, gate), against the same mixer written with the public differentiable ops and the
``reference`` scan; and ``bimamba_inner_cpu_applies``, which decides when models may take it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.ops.causal_conv1d import causal_conv1d
from visionzoo.ops.selective_scan import (
    MixerDirection,
    _cpu,
    bimamba_inner_cpu,
    bimamba_inner_cpu_applies,
    selective_scan,
)

from ._threads import at_thread_counts

needs_kernel = pytest.mark.skipif(not _cpu.is_available("cpu"), reason="no C compiler for the cpu kernels")


def make_direction(E, N, R, K, conv_bias, g):
    return MixerDirection(
        conv_weight=torch.randn(E, K, generator=g) * 0.5,
        conv_bias=torch.randn(E, generator=g) * 0.1 if conv_bias else None,
        x_proj_weight=torch.randn(R + 2 * N, E, generator=g) * E ** -0.5,
        dt_proj_weight=torch.randn(E, R, generator=g) * R ** -0.5,
        dt_proj_bias=torch.randn(E, generator=g) - 2.0,
        A_log=torch.randn(E, N, generator=g) * 0.5 + 0.5,
        D=torch.randn(E, generator=g),
    )


def mixer_inner_reference(xz, fwd, bwd):
    """The definition: per direction conv + SiLU, x_proj, dt_proj, a reference scan with the shared gate;
    the backward direction on the time-reversed sequence, its output flipped back; the mean of both."""
    E = xz.shape[-1] // 2
    x, z = xz[..., :E].transpose(1, 2), xz[..., E:].transpose(1, 2)  # (b, E, L)
    outs = []
    for w, flip in ((fwd, False), (bwd, True)):
        xi, zi = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        u = causal_conv1d(xi, w.conv_weight, w.conv_bias, activation="silu", backend="reference")
        R, N = w.dt_proj_weight.shape[1], w.A_log.shape[1]
        x_dbl = F.linear(u.transpose(1, 2), w.x_proj_weight)  # (b, L, R + 2N)
        dt, B, C = x_dbl.split([R, N, N], dim=-1)
        delta = F.linear(dt, w.dt_proj_weight).transpose(1, 2)
        y = selective_scan(u, delta, -torch.exp(w.A_log), B.transpose(1, 2), C.transpose(1, 2), D=w.D, z=zi,
                           delta_bias=w.dt_proj_bias, delta_softplus=True, backend="reference")
        outs.append(y.flip(-1) if flip else y)
    return ((outs[0] + outs[1]) / 2).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("batch,L,E,N,R,K,conv_bias", [
    (2, 67, 24, 16, 3, 4, True),   # Vim's N and K; L not a multiple of the kernel's 64-step tiles
    (1, 1, 16, 4, 2, 4, True),     # a single step
    (2, 130, 20, 5, 4, 3, False),  # E = 20: two blocks of 8 channels and a ragged one; K != 4; no conv bias
    (1, 50, 32, 16, 24, 4, True),  # x_proj rows of R + 2N = 56 (Vim-S): more than one block of 3 vectors
])
def test_matches_the_differentiable_ops(batch, L, E, N, R, K, conv_bias):
    g = torch.Generator().manual_seed(0)
    fwd, bwd = (make_direction(E, N, R, K, conv_bias, g) for _ in range(2))
    xz = torch.randn(batch, L, 2 * E, generator=g)
    expected = mixer_inner_reference(xz, fwd, bwd)
    with torch.no_grad():
        out = bimamba_inner_cpu(xz.clone(), fwd, bwd)
    assert out.shape == (batch, L, E)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_large_delta_takes_the_clamped_exp_and_matches():
    """Steps where |delta A| log2(e) exceeds 126 leave the kernel's unclamped exp for the clamped one."""
    g = torch.Generator().manual_seed(1)
    fwd, bwd = (make_direction(16, 16, 2, 4, True, g) for _ in range(2))
    fwd = fwd._replace(A_log=fwd.A_log + 5.3, dt_proj_bias=fwd.dt_proj_bias + 6.0)  # delta' ~ 4, |A| ~ 200-800
    xz = torch.randn(1, 40, 32, generator=g)
    expected = mixer_inner_reference(xz, fwd, bwd)
    with torch.no_grad():
        torch.testing.assert_close(bimamba_inner_cpu(xz.clone(), fwd, bwd), expected, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_applies_only_to_plain_fp32_cpu_inference():
    x = torch.randn(1, 3, 8)
    assert not bimamba_inner_cpu_applies(x)  # autograd on
    with torch.no_grad():
        assert bimamba_inner_cpu_applies(x)
        assert bimamba_inner_cpu_applies(x, "cpu")
        assert not bimamba_inner_cpu_applies(x, "chunked")  # a mixer pinned to another scan backend
        assert not bimamba_inner_cpu_applies(x.double())
        assert not bimamba_inner_cpu_applies(torch.empty(1, 3, 8, device="meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fused path keeps fp32 under autocast
            assert bimamba_inner_cpu_applies(x) and bimamba_inner_cpu_applies(x.bfloat16())
        assert not bimamba_inner_cpu_applies(x.bfloat16())  # bf16 without autocast: the ops
        with FlopCounterMode(display=False):  # counts the custom ops, so it must see them
            assert not bimamba_inner_cpu_applies(x)


@needs_kernel
def test_work_split_across_threads_matches():
    """With several intra-op threads the channel blocks run concurrently (each in place on its own channels)."""
    g = torch.Generator().manual_seed(2)
    fwd, bwd = (make_direction(40, 16, 3, 4, True, g) for _ in range(2))
    xz = torch.randn(3, 33, 80, generator=g)
    expected = mixer_inner_reference(xz, fwd, bwd)
    with torch.no_grad():
        out, = at_thread_counts(lambda: bimamba_inner_cpu(xz.clone(), fwd, bwd), (3,))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_batch_one_thread_count_independent():
    """At batch 1 the work is split over directions and channel blocks (the fused path: one direction per thread
    with two threads; its x-projection over blocks of rows), or over channel blocks with both directions of a
    block on one thread (the bidirectional scan): 1, 2 and 3 threads give bitwise the same output, for the fused
    path, the bidirectional scan and the paired conv."""
    from visionzoo.ops.causal_conv1d import _cpu as conv_cpu

    g = torch.Generator().manual_seed(3)
    E, L = 48, 70
    fwd, bwd = (make_direction(E, 16, 3, 4, True, g) for _ in range(2))
    xz = torch.randn(1, L, 2 * E, generator=g)
    u, delta, z = (torch.randn(1, 2 * E, L, generator=g) for _ in range(3))
    A = -torch.exp(torch.randn(2 * E, 16, generator=g) * 0.5)
    B, C = (torch.randn(1, 2, 16, L, generator=g) for _ in range(2))
    D, bias = torch.randn(2 * E, generator=g), torch.randn(2 * E, generator=g) - 1
    x, w = torch.randn(1, E, L, generator=g), torch.randn(2 * E, 4, generator=g)

    def run():
        fused = bimamba_inner_cpu(xz.clone(), fwd, bwd)
        bidir = _cpu.selective_scan_bidirectional_cpu(u, delta, A, B, C, D, z[:, :E], bias, True, "mean")
        conv = conv_cpu.causal_conv1d_bidirectional_cpu(x, w, D, "silu", torch.empty(1, 2 * E, L))
        return (fused, *bidir, conv)

    with torch.no_grad():
        runs = at_thread_counts(run)
    torch.testing.assert_close(runs[0][0], mixer_inner_reference(xz, fwd, bwd), rtol=1e-4, atol=1e-5)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_kernel
def test_packed_x_proj_weight_follows_in_place_changes():
    """The C x-projection reads a packed copy of the weight, cached per tensor: an in-place change (as
    ``load_state_dict`` makes) must reach the next call."""
    g = torch.Generator().manual_seed(4)
    fwd, bwd = (make_direction(16, 16, 2, 4, True, g) for _ in range(2))
    xz = torch.randn(1, 21, 32, generator=g)
    with torch.no_grad():
        bimamba_inner_cpu(xz.clone(), fwd, bwd)
        fwd.x_proj_weight.copy_(torch.randn(fwd.x_proj_weight.shape, generator=g) * 0.25)
        out = bimamba_inner_cpu(xz.clone(), fwd, bwd)
    torch.testing.assert_close(out, mixer_inner_reference(xz, fwd, bwd), rtol=1e-4, atol=1e-5)
