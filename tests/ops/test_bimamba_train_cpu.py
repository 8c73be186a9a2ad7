"""``bimamba_train_cpu``: a Vim mixer between its projections for CPU training as one autograd node over the C
kernels, against the mixer written with the public differentiable ops (``reference`` backends: the definition)
and with the ``cpu`` ops one by one; and ``bimamba_train_cpu_applies``, which decides when ``bimamba_inner``
takes it."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionzoo.models.vim import BiMambaMixer
from visionzoo.ops import selective_scan as ss
from visionzoo.ops.selective_scan import (
    MixerDirection,
    _cpu,
    _cpu_bwd,
    _cpu_train,
    bimamba_inner,
    bimamba_train_cpu,
    bimamba_train_cpu_applies,
    mixer_direction,
)

from .test_bimamba_inner_cpu import make_direction, mixer_inner_reference

needs_kernel = pytest.mark.skipif(not _cpu.is_available("cpu") or _cpu_bwd.load() is None,
                                  reason="no C compiler for the cpu kernels")


def leaves(d: MixerDirection) -> MixerDirection:
    return MixerDirection(*(None if t is None else t.clone().requires_grad_() for t in d))


def grads_of(fn, xz, dirs, g):
    xz = xz.clone().requires_grad_()
    y = fn(xz, *dirs)
    wanted = [xz] + [t for d in dirs for t in d if t is not None]
    return y.detach(), torch.autograd.grad(y, wanted, torch.randn(y.shape, generator=g))


@needs_kernel
@pytest.mark.parametrize("batch,L,E,N,R,K,conv_bias", [
    (2, 67, 24, 16, 3, 4, True),   # Vim's N and K; L past two 32-step checkpoint chunks
    (1, 1, 16, 4, 2, 4, True),     # a single step
    (3, 40, 20, 5, 4, 3, False),   # E = 20: ragged channel blocks; K != 4; no conv bias
])
def test_matches_the_reference_mixer(batch, L, E, N, R, K, conv_bias):
    """Output and the gradients of the input and of every weight of both directions, against the definition
    (reference conv and scan under autograd), within fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    dirs = [make_direction(E, N, R, K, conv_bias, g) for _ in range(2)]
    dirs = [d._replace(conv_weight=d.conv_weight.unsqueeze(1)) for d in dirs]  # nn.Conv1d's (E, 1, K)
    xz = torch.randn(batch, L, 2 * E, generator=g)

    def reference(xz, fwd, bwd):
        flat = [d._replace(conv_weight=d.conv_weight[:, 0]) for d in (fwd, bwd)]
        return mixer_inner_reference(xz, *flat)

    y, grads = grads_of(bimamba_train_cpu, xz, [leaves(d) for d in dirs], torch.Generator().manual_seed(1))
    y_ref, grads_ref = grads_of(reference, xz, [leaves(d) for d in dirs], torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def vim_mixer(seed=0, conv_bias=True):
    torch.manual_seed(seed)
    m = BiMambaMixer(32, d_state=8, conv_bias=conv_bias)
    with torch.no_grad():  # away from the init's symmetric values
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@needs_kernel
@pytest.mark.parametrize("conv_bias", [True, False])
def test_bimamba_inner_takes_it_in_training(monkeypatch, conv_bias):
    """``bimamba_inner`` with autograd on runs the one node (counted), and gives the op-by-op ``cpu`` path's output
    and gradients (the same kernels and products, dt_proj folded into the scans: within fp32 rounding)."""
    m = vim_mixer(conv_bias=conv_bias)
    xz = torch.randn(2, 45, 128)
    calls = []
    real = _cpu_train._TrainMixer.apply
    monkeypatch.setattr(_cpu_train._TrainMixer, "apply", lambda *a: calls.append(1) or real(*a))

    def run():
        x = xz.clone().requires_grad_()
        y = bimamba_inner(x, *m.branches())
        y.backward(torch.ones_like(y))
        out = [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters() if p.grad is not None]
        m.zero_grad(set_to_none=True)
        return out

    fused = run()
    assert calls == [1]
    monkeypatch.setattr(ss, "bimamba_train_cpu_applies", lambda x, backend="auto": False)
    op_by_op = run()
    assert calls == [1] and len(fused) == len(op_by_op)
    for a, b in zip(fused, op_by_op):  # delta's dt_proj sum runs in the kernels' order, not MKL's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


@needs_kernel
def test_applies():
    x = torch.randn(2, 5, 16)
    assert bimamba_train_cpu_applies(x)
    with torch.no_grad():
        assert not bimamba_train_cpu_applies(x)  # inference: bimamba_inner_cpu's business
    assert not bimamba_train_cpu_applies(x.double())
    assert not bimamba_train_cpu_applies(x.transpose(0, 1))  # not contiguous
    assert not bimamba_train_cpu_applies(x[:0])  # empty
    assert not bimamba_train_cpu_applies(x, backend="chunked")
    assert not bimamba_train_cpu_applies(x.bfloat16())  # a bf16 model, no autocast: the ops
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bimamba_train_cpu_applies(x) and bimamba_train_cpu_applies(x.bfloat16())  # runs in fp32
        assert not bimamba_train_cpu_applies(x.double())
    with FlopCounterMode(display=False):
        assert not bimamba_train_cpu_applies(x)  # the counter sees the custom ops


@needs_kernel
def test_autocast_runs_the_node_in_fp32():
    """Under CPU autocast (a bf16 in-projection output, backward() called inside autocast too) the node runs in fp32:
    the output is fp32 and the output and gradients are those of the fp32 node on the same (bf16-valued) input."""
    m = vim_mixer()
    xz = torch.randn(2, 12, 128).bfloat16()
    branches = m.branches()

    def run(x, autocast):
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = bimamba_inner(x, *branches)
            y.backward(torch.ones_like(y))
        out = [y.detach(), x.grad.float()] + [p.grad.clone() for p in (m.x_proj.weight, m.A_log, m.conv1d.weight)]
        m.zero_grad(set_to_none=True)
        return out

    mixed = run(xz, True)
    assert mixed[0].dtype == torch.float32 and all(t is not None for t in mixed)
    for a, b in zip(mixed, run(xz.float(), False)):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())  # the bf16 input grad


@needs_kernel
def test_other_inputs_take_the_ops():
    """Where the node does not apply (a bf16 model without autocast, a non-contiguous input) ``bimamba_inner``
    still trains."""
    m = vim_mixer().bfloat16()
    y = bimamba_inner(torch.randn(2, 12, 128).bfloat16().requires_grad_(), *m.branches())
    y.float().sum().backward()
    assert all(p.grad is not None for p in (m.x_proj.weight, m.A_log, m.conv1d.weight))
    m = vim_mixer()
    x = torch.randn(12, 2, 128).transpose(0, 1).requires_grad_()
    bimamba_inner(x, *m.branches()).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_kernel
def test_mixer_direction_grads_reach_the_modules():
    """Through ``mixer_direction``'s tensors the gradients land on the modules' own parameters."""
    m = vim_mixer()
    y = bimamba_train_cpu(torch.randn(1, 9, 128), *(mixer_direction(b) for b in m.branches()))
    y.sum().backward()
    for name, p in m.named_parameters():
        if not name.startswith(("in_proj", "out_proj")):
            assert p.grad is not None and p.grad.shape == p.shape, name


@needs_kernel
def test_vmap_takes_the_ops():
    """Under ``torch.func.vmap`` (wrapped tensors, no data pointer) neither fused CPU path runs: the custom ops'
    batching fallback gives the mixer per example."""
    m = vim_mixer()
    xz = torch.randn(2, 9, 128)
    with torch.no_grad():
        y = torch.func.vmap(lambda x: bimamba_inner(x[None], *m.branches())[0])(xz)
        torch.testing.assert_close(y, bimamba_inner(xz.clone(), *m.branches()), rtol=1e-5, atol=1e-6)
