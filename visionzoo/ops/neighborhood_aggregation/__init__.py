"""2-D neighbourhood aggregation ``na2d_av``: per-pixel, per-group weights over a clamped K x K window.

This is the value aggregation of neighbourhood attention (NATTEN, Hassani et al., CVPR 2023,
https://github.com/SHI-Labs/NATTEN, MIT) and the dynamic-kernel step of OverLoCK's ContMix (Lou & Yu,
CVPR 2025, arXiv 2502.20087), whose weights do not come from ``q . k``. NATTEN >= 0.20 dropped
``na2d_av``; this package reproduces NATTEN 0.17's semantics without it:

    out[b, g, i, j, :] = sum_{a, b'} attn[b, g, i, j, a*K + b'] * value[b, g, s_H(i) + a, s_W(j) + b', :]
    s_L(i) = clamp(i - K // 2, 0, L - K)        (windows shift inward at borders; no padding, dilation 1)

:func:`na2d_rpb` gives the relative-position bias NATTEN's ``na2d_qk(rpb=...)`` adds to the logits,
so a ContMix / neighbourhood-attention layer is ``na2d_av(softmax(logits + na2d_rpb(rpb, H, W, K)), v, K)``.

Backends (``backend=``, or ``auto``; ``VISIONZOO_BACKEND_NEIGHBORHOOD_AGGREGATION`` overrides ``auto``;
declared in ``_op.NA``):

``reference``  gather of every window + einsum, plain autograd (defines the semantics).
``torch``      ``dense`` for maps up to ``8 K^2`` pixels, else ``taps`` (see :mod:`._torch`); ``auto``
               on CPU.
``dense``      one GEMM with a scattered ``(HW x HW)`` weight matrix per (image, group).
``taps``       a loop over the ``K*K`` taps with in-place accumulation; two value-sized buffers.
``natten``     NATTEN's ``na2d_av`` when a release that has it (< 0.20) imports; plain autograd.
``triton``     Triton kernels for the forward and both gradients (see :mod:`._triton`); ``auto`` on
               CUDA (fp32 / fp16 / bf16; fp64 falls back to ``torch``), on CPU only by name under
               ``TRITON_INTERPRET=1`` (tests).

``torch``, ``dense``, ``taps`` and ``triton`` run as the custom op ``torch.ops.visionzoo.na2d_av``: it has a fake
kernel (meta device, ``torch.compile``), a FLOP formula (``2 * B * G * H * W * K^2 * c``) so
``visionzoo.utils.count_macs`` counts it, and explicit backwards for ``attn`` and ``value``.
No backend supports double backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import call
from ._common import check_inputs, rpb_index, window_starts
from ._op import BACKENDS, NA, OUTSIDE_OP, flops, na2d_av_op

__all__ = ["na2d_av", "na2d_rpb", "na2d_av_flops", "window_starts", "BACKENDS"]


def na2d_av_flops(batch: int, groups: int, height: int, width: int, kernel_size: int, channels: int) -> int:
    """FLOPs (a multiply-add counts 2) of one :func:`na2d_av` call."""
    return flops(batch, groups, height, width, kernel_size, channels)


def na2d_av(attn: Tensor, value: Tensor, kernel_size: int, *, backend: str = "auto") -> Tensor:
    """Aggregate ``value`` over each pixel's clamped ``K x K`` window with the weights ``attn``.

    Args:
        attn: ``(B, G, H, W, K*K)`` weights, taps row-major (``a * K + b``) as in NATTEN.
        value: ``(B, G, H, W, c)``.
        kernel_size: odd ``K`` with ``K <= H`` and ``K <= W``.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"dense"``, ``"taps"``, ``"natten"`` or ``"triton"``.

    Returns:
        ``(B, G, H, W, c)`` in ``value``'s dtype.
    """
    NA.check_name(backend, "na2d_av")
    check_inputs("na2d_av", attn, value, kernel_size)
    if attn.dtype != value.dtype:  # e.g. under autocast (fp32 softmax weights, bf16 values)
        common = torch.promote_types(attn.dtype, value.dtype)
        return na2d_av(attn.to(common), value.to(common), kernel_size, backend=backend).to(value.dtype)
    # reference and natten run as plain autograd ops; the others through the custom op, which selects
    # the same backend again (and its backward) from the requested name.
    return NA.dispatch(backend, value, lambda b: b.forward(attn, value, kernel_size) if b.name in OUTSIDE_OP
                       else call(na2d_av_op, attn, value, int(kernel_size), backend))


def na2d_rpb(rpb: Tensor, height: int, width: int, kernel_size: int) -> Tensor:
    """NATTEN's relative-position bias for every (pixel, tap): ``(G, 2K-1, 2K-1)`` -> ``(G, H, W, K*K)``.

    Tap ``(a, b)`` of pixel ``(i, j)`` reads ``rpb[:, s(i) + a - i + K - 1, s(j) + b - j + K - 1]``.
    """
    K = kernel_size
    if rpb.dim() != 3 or rpb.shape[1:] != (2 * K - 1, 2 * K - 1):
        raise ValueError(f"na2d_rpb: rpb must be (G, {2 * K - 1}, {2 * K - 1}) for kernel_size={K}, "
                         f"got {tuple(rpb.shape)}")
    if height < K or width < K:
        raise ValueError(f"na2d_rpb: the {height}x{width} map is smaller than the {K}x{K} window")
    idx = rpb_index(int(height), int(width), K, rpb.device)  # (H*W*K*K,)
    return rpb.flatten(1).index_select(1, idx).view(rpb.shape[0], height, width, K * K)
