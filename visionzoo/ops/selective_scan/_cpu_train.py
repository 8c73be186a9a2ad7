"""A whole Vim mixer between its projections for CPU *training*: one autograd node over the C kernels.

Why: run op by op, the training mixer is ~10 autograd nodes whose glue cost more than the convs. Profiled on a
vim_tiny training step (batch 8, 224, one thread, ~1.45 s), the backward of the two x-projections' input slices
zero-filled and copied a (batch, L, 2E) gradient twice per layer, the split of the in-projection's output
concatenated its two gradients, the scan's B / C and delta were stacked and concatenated from per-direction
pieces, and matmul's reshapes of strided gradients copied: ~0.25 s of fills, concatenations and copies.

Here every piece is written where the next one reads it: the conv (:mod:`..causal_conv1d`'s C kernel, both
directions) into a time-major ``(batch, L, 2E)`` buffer; each direction's x-projection straight from its half
of that buffer (a strided matrix, no copy) into its slot of one ``(batch * L, 2, R + 2N)`` buffer, whose B and C
columns are the scan's grouped ``B, C`` and whose first R columns ``dt_proj``'s input, as views; then the C scan
with state checkpoints and ``dt_proj`` folded in (delta computed per step from the R low-rank values, as the
inference kernel does, never written out; ``dt_proj``'s bias and the softplus inside, as the official
``selective_scan_fn``). The backward runs the C scan backward from those checkpoints (folding ``dt_proj`` the same
way, bitwise the forward's delta), the projections' gradients as matmuls on the same views (the x-projection's
input gradient added in place into the scan's ``du``), and the conv backward writing straight into the
in-projection output's gradient. Same math as the op-by-op path, within fp32 rounding (tested: delta's sum runs
in the kernels' order instead of MKL's); nothing of size ``(batch, L, 2E)`` is zero-filled, concatenated or
copied, and delta is not kept for the backward.

Taken by :func:`.bimamba_inner` where :func:`bimamba_train_cpu_applies` says so (autograd on, plain CPU tensors,
fp32 or under CPU autocast, which it runs in fp32; no tracer or FLOP counter; the ``cpu`` backends of the scan and
the conv selected); the op-by-op path (custom ops with their own autograd) serves everything else: other devices
and dtypes, ``torch.compile`` and export, double backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..causal_conv1d import _cpu as _conv_cpu
from . import _cpu, _cpu_bwd


def _cat(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return None if a is None else torch.cat([a, b])


def _lowrank_b_c(x_dbl: Tensor, batch: int, length: int, R: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views of the x-projections' output ``(batch * L, 2, R + 2N)``: ``dt_proj``'s input ``(batch, 2, R, L)`` and
    the scan's ``B, C`` ``(batch, 2, N, L)`` (one group per direction)."""
    xd = x_dbl.view(batch, length, 2, R + 2 * N).permute(0, 2, 3, 1)
    return xd[:, :, :R], xd[:, :, R:R + N], xd[:, :, R + N:]


class _TrainMixer(torch.autograd.Function):
    """``(xz, 7 forward-direction tensors, 7 backward-direction tensors) -> y``; see the module docstring.

    A direction's tensors (:class:`._cpu.MixerDirection`'s order): conv weight ``(E, 1, K)`` or ``(E, K)``, conv bias
    ``(E,)`` or None, x_proj weight ``(R + 2N, E)``, dt_proj weight ``(E, R)`` and bias ``(E,)``, ``A_log`` ``(E, N)``,
    ``D`` ``(E,)``."""

    @staticmethod
    def forward(ctx, xz: Tensor, *weights: Optional[Tensor]) -> Tensor:
        fw, bw = weights[:7], weights[7:]
        batch, length, E2 = xz.shape
        E = E2 // 2
        N, R = fw[5].shape[1], fw[3].shape[1]
        P = R + 2 * N
        rows = batch * length
        xs, z = xz[..., :E].transpose(1, 2), xz[..., E:].transpose(1, 2)  # (B, E, L) views
        conv_w = torch.cat([fw[0], bw[0]]).reshape(E2, -1)  # (2E, K)
        conv_b = _cat(fw[1], bw[1])
        # conv + SiLU of both directions (the backward one on the reversed sequence) into time-major memory
        u = _conv_cpu.causal_conv1d_bidirectional_cpu(xs, conv_w, conv_b, "silu",
                                                      xz.new_empty(batch, length, E2).transpose(1, 2))
        ut = u.transpose(1, 2).reshape(rows, E2)  # a view
        x_dbl = xz.new_empty(rows, 2, P)
        for k, d in enumerate((fw, bw)):
            torch.mm(ut[:, k * E:(k + 1) * E], d[2].t(), out=x_dbl[:, k])
        dt_low, B, C = _lowrank_b_c(x_dbl, batch, length, R, N)
        A = -torch.exp(torch.cat([fw[5], bw[5]]))
        D, dt_bias, dt_w = torch.cat([fw[6], bw[6]]), torch.cat([fw[4], bw[4]]), torch.cat([fw[3], bw[3]])
        y = xz.new_empty(batch, length, E)
        # dt_proj folded into the scan (delta = dt_w @ dt_low per channel, never written out), bias + softplus inside
        _, _, ck = _cpu.selective_scan_bidirectional_cpu(u, dt_low, A, B, C, D, z, dt_bias, True, "mean",
                                                         checkpoints=True, out=y.transpose(1, 2), dt_w=dt_w)
        ctx.save_for_backward(xz, u, x_dbl, A, D, dt_bias, dt_w, conv_w, conv_b, ck, fw[2], bw[2])
        ctx.conv_bias = conv_b is not None
        ctx.conv_shape = fw[0].shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        with torch.autocast("cpu", enabled=False):  # fp32 products, also when backward() runs under autocast
            return _TrainMixer._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        xz, u, x_dbl, A, D, dt_bias, dt_w, conv_w, conv_b, ck, xw_f, xw_b = ctx.saved_tensors
        batch, length, E2 = xz.shape
        E, N, R = E2 // 2, A.shape[1], dt_w.shape[1]
        P = R + 2 * N
        rows = batch * length
        dt_low, B, C = _lowrank_b_c(x_dbl, batch, length, R, N)
        z = xz[..., E:].transpose(1, 2)
        dut, ddt = xz.new_empty(rows, E2), xz.new_empty(rows, E2)  # (B, L, 2E) memory, as u and delta
        dxz = torch.empty_like(xz)  # z's gradient goes straight into its half
        du = dut.view(batch, length, E2).transpose(1, 2)
        _, _, dA, dB, dC, dD, _, dbias = _cpu_bwd.bidirectional_backward(
            u, dt_low, A, B, C, D, z, dt_bias, True, grad_y.transpose(1, 2), 0.5, None, ck, du=du,
            ddelta=ddt.view(batch, length, E2).transpose(1, 2), dz=dxz[..., E:].transpose(1, 2), dt_w=dt_w)
        ut = u.transpose(1, 2).reshape(rows, E2)
        dx_dbl = xz.new_empty(rows, 2, P)
        dbc = dx_dbl.view(batch, length, 2, P)
        dbc[..., R:R + N].copy_(dB.permute(0, 3, 1, 2))  # dB, dC: (B, 2, N, L) -> (B, L, 2, N)
        dbc[..., R + N:].copy_(dC.permute(0, 3, 1, 2))
        weight_grads = []
        for k, xw in enumerate((xw_f, xw_b)):
            ch = slice(k * E, (k + 1) * E)
            d_dtw = ddt[:, ch].t().mm(x_dbl[:, k, :R])
            torch.mm(ddt[:, ch], dt_w[ch], out=dx_dbl[:, k, :R])
            d_xw = dx_dbl[:, k].t().mm(ut[:, ch])
            dut[:, ch].addmm_(dx_dbl[:, k], xw)  # the x-projection's input gradient joins the scan's
            weight_grads.append((d_xw, d_dtw))
        xs = xz[..., :E].transpose(1, 2)
        _, dconv_w, dconv_b = _conv_cpu.causal_conv1d_cpu_backward(
            xs, conv_w, conv_b, "silu", du, (True, True, ctx.conv_bias), bidirectional=True,
            dx=dxz[..., :E].transpose(1, 2))
        dA_log = dA * A
        grads = []
        for k in range(2):
            ch = slice(k * E, (k + 1) * E)
            grads += [dconv_w[ch].view(ctx.conv_shape), dconv_b[ch] if dconv_b is not None else None,
                      *weight_grads[k], dbias[ch], dA_log[ch], dD[ch]]
        return (dxz, *grads)


def bimamba_train_cpu(xz: Tensor, forward: _cpu.MixerDirection, backward: _cpu.MixerDirection) -> Tensor:
    """The Vim mixer of :func:`.bimamba_inner` for CPU training: ``xz`` ``(batch, L, 2E)`` contiguous -> ``(batch, L,
    E)`` fp32, differentiable in ``xz`` and every weight (fp32) of the two directions. Under CPU autocast it runs in
    fp32 (``xz`` cast, as the inference path does: the scan and conv kernels are fp32, and the op-by-op fallback for
    bf16 was the ``chunked`` scan, ~2.5x slower than this in fp32); the out-projection after it casts as usual."""
    with torch.autocast("cpu", enabled=False):
        return _TrainMixer.apply(xz.float(), *forward, *backward)
