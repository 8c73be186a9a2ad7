"""``reference`` backend: reversed attention as a dense computation, straight from the paper.

Ding et al., "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention",
CVPR 2023, arXiv 2304.03282, §3 (Fig. 2). With child tokens ``i`` as queries and parent tokens ``j``
as keys, per head ``h``::

    A^F[h, i, :] = softmax_j(q_i . k_j * scale)            forward attention (each child: a distribution over parents)
    A^R[h, j, i] = A^F[h, i, j] * p[h, i] * m[i]           reversed attention (transposed, gated by the sender)
    out[h, j]    = sum_i A^R[h, j, i] v_i                   each parent gathers what its children send
    A^M[j, i]    = sum_h A^R[h, j, i]                       soft dependency mask ("dependency map")

Memory is O(batch * heads * N^2): the whole (B, H, N, N) matrix is held (twice, with autograd).
This backend is differentiated by ordinary autograd and is the only one with attention dropout.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def reversed_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    weight: Optional[Tensor],
    scale: float,
    dropout_p: float = 0.0,
    return_dependency: bool = False,
    return_mass: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Dense reversed attention on validated inputs.

    Shapes: ``q, k`` (B, H, N, Dk); ``v`` (B, H, N, Dv); ``weight`` (B, H, N) = p * m per child, or None (1).

    Returns ``(out (B, H, N, Dv), dependency (B, N, N) or None, mass (B, N) or None)``; ``dependency[b, j, i]``
    is what child ``i`` sends to parent ``j`` summed over heads, ``mass[b, j] = sum_i dependency[b, j, i]``.
    Both are detached.
    """
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, N_child, N_parent)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    rev = attn.transpose(-2, -1)  # (B, H, N_parent, N_child)
    if weight is not None:
        rev = rev * weight[:, :, None, :]
    out = torch.matmul(rev, v)  # (B, H, N_parent, Dv)
    dependency = mass = None
    if return_dependency or return_mass:
        dep = rev.detach().sum(dim=1)  # (B, N_parent, N_child)
        dependency = dep if return_dependency else None
        mass = dep.sum(dim=-1) if return_mass else None
    return out, dependency, mass
