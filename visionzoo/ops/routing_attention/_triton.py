"""The ``triton`` backend: not implemented yet.

Planned: one program per (image, head, query region) that loads the routed regions' K/V tiles by
index (no gathered copy), with an online softmax (forward) and the flash-attention backward with
atomic adds into dK/dV. Until it lands the backend reports itself unavailable, so ``auto`` uses
``chunked`` on every device and asking for ``triton`` raises a ``RuntimeError``.
"""
from __future__ import annotations

from torch import Tensor


def is_available(device_type: str) -> bool:
    return False


def supports(x: Tensor) -> bool:
    return False


def bra_triton(*args, **kwargs):  # pragma: no cover - unreachable while is_available() is False
    raise RuntimeError("routing_attention: the triton backend is not implemented")


bra_triton_backward = bra_triton
