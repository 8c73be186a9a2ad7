"""Short depthwise causal 1-d convolution (the conv in front of every Mamba scan).

For channels ``c`` and time ``t`` of ``x`` (batch, dim, L) and a per-channel filter ``weight``
(dim, K)::

    out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (K - 1) + k])   (x = 0 before t = 0)

with ``act`` none or SiLU. Same semantics and argument order as ``causal_conv1d_fn`` of the
causal-conv1d package (github.com/Dao-AILab/causal-conv1d, BSD-3).

Backends (``backend=``; ``auto`` can be overridden with ``VISIONZOO_BACKEND_CAUSAL_CONV1D``):

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

The op is the custom op ``torch.ops.visionzoo.causal_conv1d`` so it runs on the meta device, is
opaque to ``torch.compile`` and is counted by ``FlopCounterMode`` (``2 * batch * dim * L * K``).
Its backward recomputes the (cheap) forward under autograd.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._backend import resolve_backend
from . import _cpu

__all__ = ["causal_conv1d", "causal_conv1d_bidirectional", "BACKENDS"]

OP = "causal_conv1d"
BACKENDS = ("reference", "shifted", "cpu", "cuda")
AUTO_ORDER = ("cuda", "cpu", "shifted")
ACTIVATIONS = ("none", "silu")

_UNSET = object()
_cuda_fn: object = _UNSET


def _load_cuda() -> Optional[Callable]:
    """causal-conv1d's ``causal_conv1d_fn`` or None (cached; any import error means unavailable)."""
    global _cuda_fn
    if _cuda_fn is _UNSET:
        fn = None
        try:
            if importlib.util.find_spec("causal_conv1d") is not None:
                from causal_conv1d import causal_conv1d_fn as fn
        except Exception:  # noqa: BLE001 - a broken install must not break visionzoo
            fn = None
        _cuda_fn = fn
    return _cuda_fn


def _is_available(name: str, device_type: str) -> bool:
    if name == "cuda":
        return device_type == "cuda" and _load_cuda() is not None
    if name == "cpu":
        return device_type == "cpu" and _cpu.load() is not None
    return name in ("reference", "shifted")


def _activate(y: Tensor, activation: str) -> Tensor:
    return F.silu(y) if activation == "silu" else y


def _reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    dim, K = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=K - 1, groups=dim)[..., : x.shape[-1]]
    return _activate(y, activation)


def _shifted(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    K = weight.shape[1]
    L = x.shape[-1]
    xt = x.transpose(1, 2)  # (batch, L, dim); a view when x is time-major
    w = weight.to(x.dtype).t()  # (K, dim)
    # out[t] = bias + sum_s w[K-1-s] * x[t-s]
    if bias is None:
        y = xt * w[K - 1]
    else:
        y = torch.addcmul(bias.to(x.dtype), xt, w[K - 1])
    for s in range(1, min(K, L + 1)):
        y[:, s:].addcmul_(xt[:, : L - s], w[K - 1 - s])
    return _activate(y, activation).transpose(1, 2)


def _cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    fn = _load_cuda()
    return fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
              activation=None if activation == "none" else activation)


_FORWARD = {"reference": _reference, "shifted": _shifted, "cpu": _cpu.causal_conv1d_cpu, "cuda": _cuda}


def _resolve(backend: str, x: Tensor, weight: Tensor) -> str:
    name = resolve_backend(OP, backend, x.device.type, BACKENDS, AUTO_ORDER, _is_available)
    if name == "cpu" and backend != "cpu" and not _cpu.supports(x, weight):
        name = "shifted"  # other dtypes / long filters; an explicit request raises in the kernel wrapper
    return name


@torch.library.custom_op("visionzoo::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str) -> Tensor:
    return _FORWARD[_resolve(backend, x, weight)](x, weight, bias, activation)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, activation, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation
    ctx.backend = backend


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    name = _resolve(ctx.backend, x, weight)
    # Recompute the cheap forward under autograd; the reference/shifted paths are plain torch ops.
    fn = _cuda if name == "cuda" else _shifted
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip((x, weight, bias), needs)]
        out = fn(leaves[0], leaves[1], leaves[2], ctx.activation)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return (*(next(grads) if (t is not None and t.requires_grad) else None for t in leaves), None, None)


_causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.causal_conv1d)
def _flops(x_shape, weight_shape, *args, **kwargs) -> int:
    batch, dim, length = x_shape
    return 2 * batch * dim * length * weight_shape[1]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Depthwise causal conv1d. x: (batch, dim, L), any strides; weight: (dim, K) or (dim, 1, K);
    bias: (dim,) or None; activation: None / "silu". Returns (batch, dim, L) in x's dtype."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: weight must be (dim, K) with dim={x.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal_conv1d: bias must be ({x.shape[1]},), got {tuple(bias.shape)}")
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    return _causal_conv1d_op(x, weight, bias, act, backend)


# ---------------------------------------------------------------- both directions of a Vim mixer


def _bidirectional_out(x: Tensor) -> Tensor:
    """The output buffer: time-major ``(batch, L, 2E)`` memory when ``x``'s channels are contiguous."""
    batch, E, length = x.shape
    if x.stride(1) == 1:
        return x.new_empty(batch, length, 2 * E).transpose(1, 2)
    return x.new_empty(batch, 2 * E, length)


@torch.library.custom_op("visionzoo::causal_conv1d_bidirectional", mutates_args=())
def _causal_conv1d_bidirectional_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                                    backend: str) -> Tensor:
    out = _bidirectional_out(x)
    if _resolve(backend, x, weight) == "cpu":
        return _cpu.causal_conv1d_bidirectional_cpu(x, weight, bias, activation, out)
    return out.copy_(_causal_conv1d_op(torch.cat([x, x.flip(-1)], dim=1), weight, bias, activation, backend))


@_causal_conv1d_bidirectional_op.register_fake
def _(x, weight, bias, activation, backend):
    return _bidirectional_out(x)


def _bidirectional_setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation = activation


def _bidirectional_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip((x, weight, bias), needs)]
        xx = torch.cat([leaves[0], leaves[0].flip(-1)], dim=1)
        out = _shifted(xx, leaves[1], leaves[2], ctx.activation)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return (*(next(grads) if (t is not None and t.requires_grad) else None for t in leaves), None, None)


_causal_conv1d_bidirectional_op.register_autograd(_bidirectional_backward,
                                                  setup_context=_bidirectional_setup_context)


@register_flop_formula(torch.ops.visionzoo.causal_conv1d_bidirectional)
def _bidirectional_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    batch, E, length = x_shape
    return 2 * batch * 2 * E * length * weight_shape[1]


def causal_conv1d_bidirectional(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Both directions of a Vim mixer's conv: ``cat([conv(x, w[:E]), conv(flip(x), w[E:])])`` on channels.

    x: (batch, E, L), any strides; weight: (2E, K) or (2E, 1, K); bias: (2E,) or None. Returns
    (batch, 2E, L); channels [E, 2E) are in the flipped time order. The ``cpu`` backend reads ``x``
    backwards in place (no flipped or concatenated copy); other backends concatenate the flipped
    copy and run :func:`causal_conv1d`.
    """
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_bidirectional: x must be (batch, E, L), got shape {tuple(x.shape)}")
    E = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != 2 * E:
        raise ValueError(f"causal_conv1d_bidirectional: weight must be (2E, K) with 2E={2 * E}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (2 * E,):
        raise ValueError(f"causal_conv1d_bidirectional: bias must be ({2 * E},), got {tuple(bias.shape)}")
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_bidirectional: activation must be None or 'silu', got {activation!r}")
    return _causal_conv1d_bidirectional_op(x, weight, bias, act, backend)
