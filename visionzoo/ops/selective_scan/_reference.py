"""``reference`` backend: the selective scan as a plain loop over the sequence.

This is the algorithm of mamba-ssm's ``selective_scan_ref`` (Gu & Dao, arXiv 2312.00752,
github.com/state-spaces/mamba, Apache-2.0), re-written here. It defines the semantics that the
other backends are tested against; it is slow (one small tensor op per time step plus full-size
``(batch, dim, L, N)`` temporaries) and is differentiated by ordinary autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(u: Tensor) -> torch.dtype:
    """Internal math runs in fp32, or in fp64 when ``u`` is fp64 (used by the gradient checks)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def expand_groups(x: Tensor, dim: int) -> Tensor:
    """``(batch, G, N, L)`` -> ``(batch, dim, N, L)``: channel ``d`` uses group ``d // (dim // G)``."""
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                             z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                             delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """Sequential selective scan on already validated inputs.

    Every backend's forward takes these arguments, in this order (the ops pass them positionally), and
    returns the same two tensors; every backward takes ``(inputs, delta_softplus, grad_out, grad_last_state,
    needs)`` with ``inputs = (u, delta, A, B, C, D, z, delta_bias)`` and returns their gradients.

    Shapes: ``u, delta, z``: ``(batch, dim, L)``; ``A``: ``(dim, N)``; ``B, C``: ``(batch, G, N, L)``
    (the 3-d form ``(batch, N, L)`` must have been unsqueezed to ``G = 1`` by the caller);
    ``D, delta_bias``: ``(dim,)``.

    Returns ``(out, last_state)``: ``out`` ``(batch, dim, L)`` in ``u``'s dtype and the final state
    ``h_L`` ``(batch, dim, N)`` in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    ct = compute_dtype(u)
    batch, dim, length = u.shape
    u_c = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    A_c = A.to(ct)
    B_c = expand_groups(B.to(ct), dim)  # (batch, dim, N, L)
    C_c = expand_groups(C.to(ct), dim)

    # Discretisation, for every step at once: exp(delta * A) and delta * B * u, shape (batch, dim, L, N).
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", dt, A_c))
    delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", dt, B_c, u_c)

    h = u_c.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = delta_A[:, :, t] * h + delta_B_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, C_c[:, :, :, t]))
    y = torch.stack(ys, dim=2)  # (batch, dim, L)

    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), h
