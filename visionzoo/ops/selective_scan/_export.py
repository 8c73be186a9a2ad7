"""The selective scan for exporters: one ``torch.ops.higher_order.scan`` over chunks of time steps.

The plain-aten reference unrolls the recurrence into a few ops per time step, so an exported graph grows
with the number of tokens (Vim-Ti at 224: thousands of nodes per layer). Here what does not depend on the
state runs once for the whole sequence (``softplus``, ``delta * u``, the layout changes, ``D`` and the gate),
and the recurrence ``h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t`` runs in torch's ``scan``
higher-order op over chunks of :data:`STEPS` steps: each iteration computes its chunk's decays and drives
at once, the ``STEPS`` state updates, and its outputs ``y_t = sum_n C_t[n] h_t[n]`` at once, so no
``(L, batch, dim, N)`` tensor is ever materialised. ``torch.export`` records the op, and the dynamo ONNX
exporter writes it as one ONNX ``Scan`` per call with that body: the node count of the graph does not depend
on the token count (the sequence is padded to whole chunks with ``delta = 0``: decay 1, drive 0).

The state is laid out ``(batch, N, G, dim / G)``, channels innermost, so every broadcast repeats contiguous
rows (fast in onnxruntime), and ``softplus`` is written out (onnxruntime's ``Softplus`` is slow).

Same semantics, arguments and outputs as :func:`._reference.selective_scan_reference` and the custom ops
(fp32: the same products and sums as the reference's recurrence). Inference only: exporters trace without
gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from ._reference import compute_dtype


STEPS = 4  # time steps per scan iteration, unrolled in the body (4: fastest in onnxruntime of 1, 2, 4, 8, 16)


def _chunk(h: Tensor, xs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]):
    """``STEPS`` time steps: the decays and drives of the chunk at once, then the recurrence step by step, then
    the chunk's outputs at once. The chunk's tensors stay in cache (no ``(L, batch, N, dim)`` tensor).

    ``h``: the state ``(1, batch, N, G, dim/G)``. ``xs``: ``A`` ``(N, G, dim/G)`` (the same for every chunk: a
    closure over it does not trace with a dynamic batch), ``delta, delta * u`` ``(T, batch, 1, G, dim/G)``,
    ``B, C`` ``(T, batch, N, G, 1)``.
    """
    A, dt, dtu, B, C = xs
    decay, drive = torch.exp(dt * A), dtu * B  # (T, batch, N, G, dim/G)
    states = []
    for a, b in zip(decay.split(1), drive.split(1)):
        h = torch.addcmul(b, a, h)
        states.append(h)
    return h.clone(), (torch.cat(states) * C).sum(2)  # (T, batch, G, dim/G)


def selective_scan_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                        z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """``(out (batch, dim, L), last_state (batch, dim, N))`` with the recurrence in one scan op.

    Shapes as :func:`._reference.selective_scan_reference` (``B, C``: ``(batch, G, N, L)``).
    """
    ct = compute_dtype(u)
    batch, dim, length = u.shape
    groups, N = B.shape[1], A.shape[1]
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:  # F.softplus, written out: onnxruntime's Softplus is ~10x slower than these ops
        dt = torch.where(dt > 20.0, dt, torch.log1p(torch.exp(dt)))
    u_c = u.to(ct)
    # Time-major with the state index outside the channels, (L, batch, N, G, dim / G): every broadcast
    # below repeats whole contiguous rows of channels, which runtimes (onnxruntime) do fast. The time
    # axis is padded to whole chunks with delta = 0 (decay 1, drive 0: the state passes unchanged).
    chunks = -(-length // STEPS)
    pad = (0, chunks * STEPS - length)
    per_group = (chunks, STEPS, batch, 1, groups, dim // groups)
    dt_t = F.pad(dt, pad).permute(2, 0, 1).reshape(per_group)
    dtu_t = F.pad(dt * u_c, pad).permute(2, 0, 1).reshape(per_group)
    B_t, C_t = (F.pad(x.to(ct), pad).permute(3, 0, 2, 1).reshape(chunks, STEPS, batch, N, groups, 1) for x in (B, C))
    A_t = A.to(ct).t().reshape(1, N, groups, dim // groups).expand(chunks, N, groups, dim // groups)
    h0 = dt_t.new_zeros(1, batch, N, groups, dim // groups)
    last, y = scan(_chunk, h0, (A_t, dt_t, dtu_t, B_t, C_t))  # y: (chunks, T, batch, G, dim/G)
    y = y.reshape(chunks * STEPS, batch, dim)[:length].permute(1, 2, 0)  # (batch, dim, L)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), last.reshape(batch, N, dim).transpose(1, 2)


def selective_scan_op_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """``visionzoo::selective_scan`` (same arguments) as a scan op, for an exporter's decomposition table."""
    return selective_scan_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_bidirectional_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reduce,
                                      reversed_inputs, backend):
    """``visionzoo::selective_scan_bidirectional`` (same arguments, see :mod:`._bidirectional`) as one scan
    op over both directions' channels, the backward half in reversed time order."""
    from ._bidirectional import _scan_order

    dim = u.shape[1] // 2
    # A gate shared by both directions multiplies their sum once, afterwards (no time-reversed copy of z).
    gate_after = z is not None and z.shape[1] == dim and reduce != "none"
    stacked, last = selective_scan_scan(*_scan_order(u, delta, A, B, C, D, None if gate_after else z, delta_bias,
                                                     reversed_inputs), delta_softplus)
    out_f, out_b = stacked[:, :dim], stacked[:, dim:].flip(-1)
    if reduce == "none":
        out = torch.cat([out_f, out_b], dim=1)
    else:
        out = out_f + out_b
        if reduce == "mean":
            out = out * 0.5
    if gate_after:
        out = out * F.silu(z.to(out.dtype))
    return out, last.to(compute_dtype(u))
