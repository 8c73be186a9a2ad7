"""``chunked`` backend: a fast, exact selective scan in pure PyTorch (any device).

Algorithm (see also the package docstring). Internally everything is *time-major*: per-channel
sequences are ``(L, batch, dim)`` and per-state tensors ``(L, batch, G, N, dim // G)``, so one time
step of the state is one contiguous slice and the channel axis (the longest) is innermost.

Forward, for blocks of ``T`` consecutive steps (``T`` is picked so one block of states is ~2 MB):

1. ``dA = exp2(delta * A * log2(e))`` and ``dBu = (delta * u) B`` for the ``T`` steps of the block,
   written into two preallocated buffers (two broadcasting ops + one ``exp2_``; ``exp2`` is ~2x
   cheaper than ``exp`` on CPU).
2. The recurrence ``h_t = dA_t * h_{t-1} + dBu_t`` as ``T`` in-place ``addcmul_`` calls, the state
   living in the ``dBu`` buffer (row 0 holds the state carried in from the previous block).
3. ``y_t = C_t . h_t`` for the whole block as one ``bmm`` ``(T*batch*G, 1, N) @ (T*batch*G, N, dim/G)``.

The state update is the sequential product form ``dA_t * h_{t-1}``, so it is exact in fp32 whatever
``delta * A`` is (no ``exp(-cumsum)`` rescaling that could overflow). Blocking keeps every temporary
small (memory ``O(batch*dim*N*T)`` besides a few ``O(batch*dim*L)`` sequences), so there are no
full-length ``(L, ..., N)`` temporaries, whose fresh allocation and page faults cost as much as the
arithmetic on CPU.

Backward (analytic): a forward pass recomputes ``y`` and stores the state at the start of every block;
the blocks are then visited in reverse. Each block recomputes its states from its checkpoint, and the
adjoint ``g_t = dL/dh_t = C_t dy_t + dA_{t+1} * g_{t+1}`` is run backwards with the same in-place
``addcmul_`` recurrence. From ``g`` and ``h`` the gradients follow with a few block-wide ops and bmm's:
``dC_t = sum_d dy_t h_t``, ``d(delta u)_t = sum_n g_t B_t``, ``dB_t = sum_d g_t delta_t u_t``, and through
``dA_t = exp(delta_t A)`` with ``X_t = g_t * h_{t-1} * dA_t``: ``d delta_t += sum_n X_t A``,
``dA += sum_t X_t delta_t``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._reference import compute_dtype

LOG2E = math.log2(math.e)
_BLOCK_ELEMENTS = 1 << 19  # target size of one block of states (T * batch * dim * N elements)
_MAX_BLOCK = 64


def block_size(batch: int, dim: int, dstate: int) -> int:
    """Number of time steps processed per block."""
    return max(1, min(_MAX_BLOCK, _BLOCK_ELEMENTS // max(1, batch * dim * dstate)))


def time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``(batch, dim, L)`` -> contiguous ``(L, batch, dim)`` in ``dtype``; no copy if ``x`` already is one."""
    v = x.permute(2, 0, 1)
    if v.dtype == dtype and v.is_contiguous():
        return v
    return torch.empty(v.shape, dtype=dtype, device=x.device).copy_(v)


class _Prepared:
    """Inputs converted to the compute dtype and the time-major layouts used by the scan."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus):
        ct = compute_dtype(u)
        self.dtype = ct
        self.batch, self.dim, self.length = u.shape
        self.groups, self.dstate = B.shape[1], B.shape[2]
        self.dg = self.dim // self.groups
        b, G, N, dg = self.batch, self.groups, self.dstate, self.dg

        self.uT = time_major(u, ct)  # (L, b, d)
        dT = time_major(delta, ct)
        if delta_bias is not None:
            dT = dT + delta_bias.to(ct)
        self.dT_pre = dT  # delta before softplus (the backward needs it)
        self.dT = F.softplus(dT) if delta_softplus else dT  # (L, b, d)
        self.duT = self.dT * self.uT  # (L, b, d)
        self.BT = B.to(ct).permute(3, 0, 1, 2).contiguous()  # (L, b, G, N)
        self.CT = C.to(ct).permute(3, 0, 1, 2).contiguous()  # (L, b, G, N)
        # A as (G, N, dg) so that it broadcasts against (L, b, G, N, dg) states.
        self.A_gnd = A.to(ct).reshape(G, dg, N).transpose(1, 2).contiguous()
        self.A2_gnd = self.A_gnd * LOG2E
        self.block = block_size(b, self.dim, N)

    def new(self, *shape) -> Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.uT.device)

    def state_shape(self):
        return (self.batch, self.groups, self.dstate, self.dg)

    def discretize(self, s: int, n: int, dA: Tensor, dBu: Tensor) -> None:
        """Fill ``dA`` with exp(delta A) and ``dBu`` with delta u B for steps ``s .. s+n-1``.

        ``dA``, ``dBu``: ``(n, b, G, N, dg)`` buffers.
        """
        b, G, N, dg = self.state_shape()
        dt = self.dT[s:s + n].view(n, b, G, 1, dg)
        torch.mul(dt, self.A2_gnd, out=dA).exp2_()
        torch.mul(self.duT[s:s + n].view(n, b, G, 1, dg), self.BT[s:s + n].view(n, b, G, N, 1), out=dBu)

    def scan(self, y: Optional[Tensor] = None, checkpoints: Optional[list] = None) -> Tensor:
        """Run the recurrence over the whole sequence.

        Writes ``y_t = C_t . h_t`` into ``y`` (``(L, b, d)``) when given, appends the state at the start of
        every block to ``checkpoints`` when given, and returns the last state ``(b, G, N, dg)``.
        """
        b, G, N, dg = self.state_shape()
        L, T = self.length, self.block
        H = self.new(T + 1, b, G, N, dg)  # H[0]: state carried in; H[1 + i]: state after step s + i
        dA = self.new(T, b, G, N, dg)
        H[0].zero_()
        Hs, dAs = H.unbind(0), dA.unbind(0)
        for s in range(0, L, T):
            n = min(T, L - s)
            if checkpoints is not None:
                checkpoints.append(Hs[0].clone())
            self.discretize(s, n, dA[:n], H[1:n + 1])
            for i in range(n):
                Hs[i + 1].addcmul_(dAs[i], Hs[i])
            if y is not None:
                rows = n * b * G
                torch.bmm(self.CT[s:s + n].view(rows, 1, N), H[1:n + 1].view(rows, N, dg),
                          out=y[s:s + n].view(rows, 1, dg))
            Hs[0].copy_(Hs[n])
        return Hs[0]

    def state_to_bdn(self, h: Tensor) -> Tensor:
        """``(b, G, N, dg)`` -> new contiguous ``(b, d, N)``."""
        return h.transpose(2, 3).reshape(self.batch, self.dim, self.dstate).contiguous()


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                           z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """Blocked selective scan; arguments and outputs as :func:`._reference.selective_scan_reference`
    (``out`` has time-major strides when ``u`` is a time-major view, otherwise it is contiguous)."""
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    y = p.new(p.length, p.batch, p.dim)
    last = p.scan(y=y)
    # out = (y + D u) * silu(z), computed in u's layout.
    out = y.permute(1, 2, 0)
    if not u.permute(2, 0, 1).is_contiguous():
        out = out.contiguous()
    if D is not None:
        out.addcmul_(u, D.to(p.dtype)[:, None])
    if z is not None:
        out.mul_(F.silu(z.to(p.dtype)))
    return out.to(u.dtype), p.state_to_bdn(last)


def selective_scan_chunked_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                                    z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                                    grad_out: Optional[Tensor], grad_last_state: Optional[Tensor]) -> tuple:
    """Gradients of ``selective_scan_chunked`` (analytic reverse scan).

    ``grad_out``: ``(batch, dim, L)`` or None (zero); ``grad_last_state``: ``(batch, dim, N)`` or None.
    Returns the gradients of ``(u, delta, A, B, C, D, z, delta_bias)`` with the inputs' shapes and
    dtypes (None for the optional inputs that are None).
    """
    p = _Prepared(u, delta, A, B, C, delta_bias, delta_softplus)
    b, G, N, dg = p.state_shape()
    L, T, ct = p.length, p.block, p.dtype

    # Pass 1: recompute y and keep the state at the start of every block.
    y = p.new(L, b, p.dim) if z is not None else None  # y is only needed for dz
    checkpoints: list[Tensor] = []
    p.scan(y=y, checkpoints=checkpoints)

    # Output stage: out = (y + D u) * silu(z).  dy is the gradient w.r.t. y (and y + D u).
    dout = time_major(grad_out, ct) if grad_out is not None else p.new(L, b, p.dim).zero_()
    dz = dD = None
    if z is not None:
        zT = time_major(z, ct)
        sig = torch.sigmoid(zT)
        y_pre = y if D is None else torch.addcmul(y, p.uT, D.to(ct))
        # d silu(z) / dz = sig * (1 + z * (1 - sig))
        dz = dout * y_pre * sig * (1 + zT * (1 - sig))
        dy = dout * zT * sig
    else:
        dy = dout
    if D is not None:
        dD = (dy * p.uT).sum((0, 1))
        du = dy * D.to(ct)
    else:
        du = torch.zeros_like(dy)

    # Pass 2: blocks in reverse order.
    ddu = p.new(L, b, p.dim)  # gradient w.r.t. delta * u
    ddt = p.new(L, b, p.dim)  # gradient w.r.t. delta (after softplus) through exp(delta A)
    dBT = p.new(L, b, G, N)
    dCT = p.new(L, b, G, N)
    dA_gnd = torch.zeros_like(p.A_gnd)
    H = p.new(T + 1, b, G, N, dg)
    dA = p.new(T, b, G, N, dg)
    Gr = p.new(T, b, G, N, dg)  # adjoint g_t = dL/dh_t
    Hs, dAs, Gs = H.unbind(0), dA.unbind(0), Gr.unbind(0)
    # Gradient flowing into the last state of the current block from later steps.
    carry = None
    if grad_last_state is not None:
        carry = grad_last_state.to(ct).reshape(b, G, dg, N).transpose(2, 3)
    starts = list(range(0, L, T))
    for k in reversed(range(len(starts))):
        s = starts[k]
        n = min(T, L - s)
        rows = n * b * G
        # Recompute the states of this block.
        Hs[0].copy_(checkpoints[k])
        p.discretize(s, n, dA[:n], H[1:n + 1])
        for i in range(n):
            Hs[i + 1].addcmul_(dAs[i], Hs[i])
        # Adjoint: g_t = C_t dy_t + dA_{t+1} g_{t+1}.
        dy_blk = dy[s:s + n]
        torch.mul(p.CT[s:s + n].view(n, b, G, N, 1), dy_blk.view(n, b, G, 1, dg), out=Gr[:n])
        if carry is not None:
            Gs[n - 1].add_(carry)
        for i in range(n - 2, -1, -1):
            Gs[i].addcmul_(dAs[i + 1], Gs[i + 1])
        carry = dAs[0] * Gs[0]
        # dC_t[n] = sum_j dy_t[j] h_t[n, j];  d(delta u)_t[j] = sum_n g_t[n, j] B_t[n];
        # dB_t[n] = sum_j g_t[n, j] (delta u)_t[j]   (j runs over the channels of a group).
        # (row-vector @ transposed matrix: much faster on CPU than the matrix @ column-vector form)
        torch.bmm(dy_blk.view(rows, 1, dg), H[1:n + 1].view(rows, N, dg).transpose(1, 2),
                  out=dCT[s:s + n].view(rows, 1, N))
        torch.bmm(p.BT[s:s + n].view(rows, 1, N), Gr[:n].view(rows, N, dg), out=ddu[s:s + n].view(rows, 1, dg))
        torch.bmm(p.duT[s:s + n].view(rows, 1, dg), Gr[:n].view(rows, N, dg).transpose(1, 2),
                  out=dBT[s:s + n].view(rows, 1, N))
        # Through dA_t = exp(delta_t A): X_t = g_t * h_{t-1} * dA_t;  d delta_t = sum_n X_t A,  dA = sum_t X_t delta_t.
        # (Gr is free once the bmm's above are done; it serves as the scratch buffer.)
        X = dA[:n].mul_(Gr[:n]).mul_(H[:n])
        torch.sum(torch.mul(X, p.A_gnd, out=Gr[:n]), dim=3, out=ddt[s:s + n].view(n, b, G, dg))
        dA_gnd += torch.mul(X, p.dT[s:s + n].view(n, b, G, 1, dg), out=Gr[:n]).sum((0, 1))

    ddelta = ddt.addcmul_(ddu, p.uT)
    du.addcmul_(ddu, p.dT)
    if delta_softplus:
        ddelta.mul_(torch.sigmoid(p.dT_pre))
    d_bias = ddelta.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None

    def seq_grad(g: Tensor, like: Tensor) -> Tensor:  # (L, b, d) -> (b, d, L)
        return g.permute(1, 2, 0).to(like.dtype)

    grad_A = dA_gnd.transpose(1, 2).reshape(p.dim, N).to(A.dtype)
    grad_B = dBT.permute(1, 2, 3, 0).to(B.dtype)
    grad_C = dCT.permute(1, 2, 3, 0).to(C.dtype)
    return (
        seq_grad(du, u),
        seq_grad(ddelta, delta),
        grad_A,
        grad_B,
        grad_C,
        dD.to(D.dtype) if dD is not None else None,
        seq_grad(dz, z) if dz is not None else None,
        d_bias,
    )
