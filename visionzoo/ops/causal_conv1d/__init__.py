"""Short depthwise causal 1-d convolution (the conv in front of every Mamba scan).

For channels ``c`` and time ``t`` of ``x`` (batch, dim, L) and a per-channel filter ``weight``
(dim, K)::

    out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (K - 1) + k])   (x = 0 before t = 0)

with ``act`` none or SiLU. Same semantics and argument order as ``causal_conv1d_fn`` of the
causal-conv1d package (github.com/Dao-AILab/causal-conv1d, BSD-3).

Backends (``backend=``; ``auto`` can be overridden with ``VISIONZOO_BACKEND_CAUSAL_CONV1D``; declared in
``_op.CONV``, one file each):

``reference``
    ``F.conv1d`` with ``groups=dim`` and ``K - 1`` zeros of padding, cropped to ``L``.
``shifted``
    ``K`` fused multiply-adds on time-shifted slices in a time-major ``(batch, L, dim)`` layout.
    It reads a time-major ``x`` (a ``(batch, dim, L)`` view of ``(batch, L, dim)`` memory, as a
    ``Linear`` produces) without a transposing copy and keeps ``x``'s memory layout; on CPU it is
    about as fast as oneDNN's depthwise conv1d (benchmarks/causal_conv1d_cpu.md).
``cpu``
    conv + bias + SiLU in one pass in C (:mod:`._cpu`, compiled on first use by
    :mod:`visionzoo.ops._cpu_build`): every input read once, every output written once. fp32, up to
    16 taps; the default on CPU when a C compiler is found (``shifted`` otherwise).
``cuda``
    the causal-conv1d package's kernel, imported lazily, when importable and ``x`` is on CUDA.

The op is the custom op ``torch.ops.visionzoo.causal_conv1d`` (:mod:`._op`) so it runs on the meta
device, is opaque to ``torch.compile`` and is counted by ``FlopCounterMode`` (``2 * batch * dim * L * K``).
Its backward recomputes the (cheap) forward under autograd.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._dispatch import call
from ._op import BACKENDS, CONV, causal_conv1d_bidirectional_op, causal_conv1d_op

__all__ = ["causal_conv1d", "causal_conv1d_bidirectional", "BACKENDS"]

ACTIVATIONS = ("none", "silu")


def _validate(name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
              backend: str) -> tuple[Tensor, str]:
    """Check shapes and the activation; return ``weight`` as ``(channels, K)`` and the activation name."""
    bidirectional = name == "causal_conv1d_bidirectional"
    x_label, label = ("E", "2E") if bidirectional else ("dim", "dim")
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (batch, {x_label}, L), got shape {tuple(x.shape)}")
    CONV.check_name(backend, name)
    channels = 2 * x.shape[1] if bidirectional else x.shape[1]
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"{name}: weight must be ({label}, K) with {label}={channels}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{name}: bias must be ({channels},), got {tuple(bias.shape)}")
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be None or 'silu', got {activation!r}")
    return weight, act


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None, *,
                  backend: str = "auto") -> Tensor:
    """Depthwise causal conv1d. x: (batch, dim, L), any strides; weight: (dim, K) or (dim, 1, K);
    bias: (dim,) or None; activation: None / "silu". Returns (batch, dim, L) in x's dtype."""
    weight, act = _validate("causal_conv1d", x, weight, bias, activation, backend)
    return call(causal_conv1d_op, x, weight, bias, act, backend)


def causal_conv1d_bidirectional(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                                activation: Optional[str] = None, *, backend: str = "auto") -> Tensor:
    """Both directions of a Vim mixer's conv: ``cat([conv(x, w[:E]), conv(flip(x), w[E:])])`` on channels.

    x: (batch, E, L), any strides; weight: (2E, K) or (2E, 1, K); bias: (2E,) or None. Returns
    (batch, 2E, L); channels [E, 2E) are in the flipped time order. The ``cpu`` backend reads ``x``
    backwards in place (no flipped or concatenated copy); other backends concatenate the flipped
    copy and run :func:`causal_conv1d`.
    """
    weight, act = _validate("causal_conv1d_bidirectional", x, weight, bias, activation, backend)
    return call(causal_conv1d_bidirectional_op, x, weight, bias, act, backend)
