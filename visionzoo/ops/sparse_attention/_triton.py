"""The ``triton`` backend: not implemented yet.

Planned: one program per (batch, head, block of query rows) that loads each row's ``K`` kept keys and
values by index (no gathered copy) with an online softmax, and the backward with atomic adds into
dK/dV. Until it lands the backend reports itself unavailable, so ``auto`` never picks it and asking
for ``triton`` raises a ``RuntimeError``.
"""
from __future__ import annotations

from torch import Tensor


def is_available(device_type: str) -> bool:
    return False


def supports(x: Tensor) -> bool:
    return False


def sparse_attention_triton(*args, **kwargs):  # pragma: no cover - unreachable while is_available() is False
    raise RuntimeError("sparse_attention: the triton backend is not implemented")


sparse_attention_triton_backward = sparse_attention_triton
