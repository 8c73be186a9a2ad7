"""Bidirectional selective scan: both directions of a Vim mixer in one call (``triton``: one launch).

Vim's ``bimamba_type="v2"`` mixer (Zhu et al., arXiv 2401.09417) runs a second, independent scan (own
``A``, ``D``, ``dt_proj``, ``x_proj``, conv) over the time-reversed token sequence, flips its output
back and averages it with the forward scan. Here every tensor is given in the *original* time order
and the two directions are stacked as channels::

    u, delta   (batch, 2 dim, L)   channels [0, dim): forward direction; [dim, 2 dim): backward direction
    A          (2 dim, N);  D, delta_bias  (2 dim,)
    B, C       (batch, G, N, L) with G even: groups [0, G/2) are the forward direction's, [G/2, G) the
               backward direction's (channel c uses group c // (2 dim / G), as in ``selective_scan``)
    z          None, (batch, dim, L) shared by both directions (Vim: the backward branch's gate is the
               flipped z, i.e. the same z in the original order), or (batch, 2 dim, L)

The backward direction is the scan run from ``t = L - 1`` down to ``0``, i.e. for the stacked channels
``b`` (``reference`` semantics; ``flip`` along ``L``)::

    out_f = selective_scan(u_f, ...)            out_b = flip(selective_scan(flip(u_b), ..., flip(z)))
    out   = (out_f + out_b) / 2  (reduce="mean"),  out_f + out_b ("sum"),  cat([out_f, out_b]) ("none")

``last_state`` is ``(batch, 2 dim, N)``; for the backward direction it is the state after ``t = 0``.

``reversed_inputs=True`` takes the backward direction's ``u, delta, B, C`` already time-reversed instead
(Vim computes them from the flipped sequence, because its causal conv has to see it flipped); the
output and a shared ``z`` are still in the original order.

Backends. ``triton``: one forward launch (the backward direction's programs index time as ``L - 1 - t``,
and read the shared ``z`` / ``grad_out`` by channel offset: no flipped, stacked or sliced copies) and one
backward launch; the two directions' outputs are added by torch (one elementwise op). Every other
backend (``reference``, ``chunked``, ``cpu``, ``mamba``) runs one plain scan (and its own backward) over
the stacked channels with the backward half time-reversed: flipped copies of whatever is not already
reversed (with ``reversed_inputs=True``: ``z`` and the output only, exactly the plain-scan formulation
Vim used before), so the entry point works on every device.

The op is the custom op ``torch.ops.visionzoo.selective_scan_bidirectional`` (fake kernel, FLOP formula,
autograd, plain-aten path), like ``visionzoo::selective_scan``, and selects its backend through the same
declaration (``_op.SCAN``, ``VISIONZOO_BACKEND_SELECTIVE_SCAN``). Its public entry and validation are
:func:`visionzoo.ops.selective_scan.selective_scan_bidirectional`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._dispatch import register_aten_path
from . import _cpu, _cpu_bwd, _op, _triton
from ._op import SCAN, output_strides
from ._reference import compute_dtype, selective_scan_reference

REDUCTIONS = ("mean", "sum", "none")

# The cpu forward's state checkpoints, handed to the backward (which then does not recompute them): the
# op's forward keeps them here under its output tensor's id (dropped when that tensor dies) when the caller
# asked for them (:func:`keep_checkpoints`, around a call under autograd), and ``_setup_context`` moves them
# onto the autograd context. Where that does not happen (other backends, compiled graphs) the backward
# recomputes them.
_CHECKPOINTS: dict[int, Tensor] = {}
_WANT = threading.local()


@contextlib.contextmanager
def keep_checkpoints(wanted: bool):
    """Whether the ``cpu`` forward called inside keeps its checkpoints for the backward (under autograd)."""
    previous, _WANT.on = getattr(_WANT, "on", False), wanted
    try:
        yield
    finally:
        _WANT.on = previous


def _unflip_half(x: Tensor, half: int) -> Tensor:
    """``cat([x[:, :half], flip(x[:, half:])])`` along dim 1 (the backward half time-reversed)."""
    return torch.cat([x[:, :half], x[:, half:].flip(-1)], dim=1)


def _scan_order(u, delta, A, B, C, D, z, delta_bias, reversed_inputs):
    """The stacked inputs of one plain scan that computes both directions: the backward half time-reversed.

    With ``reversed_inputs`` (Vim's layout) ``u, delta, B, C`` already are; a shared ``z`` is stacked
    with its flip.
    """
    dim = u.shape[1] // 2
    if not reversed_inputs:
        hg = B.shape[1] // 2
        u, delta, B, C = _unflip_half(u, dim), _unflip_half(delta, dim), _unflip_half(B, hg), _unflip_half(C, hg)
    if z is not None:
        if z.shape[1] == dim:
            z = torch.cat([z, z.flip(-1)], dim=1)
        elif not reversed_inputs:
            z = _unflip_half(z, dim)
    return u, delta, A, B, C, D, z, delta_bias


def _combine(u: Tensor, out_f: Tensor, out_b: Tensor, reduce: str) -> Tensor:
    """Both directions' outputs (original time order, ``(batch, dim, L)`` each) -> the op's output."""
    batch, _, length = u.shape
    dim = out_f.shape[1]
    channels = 2 * dim if reduce == "none" else dim
    out = torch.empty_strided((batch, channels, length), output_strides(u, channels), dtype=u.dtype, device=u.device)
    if reduce == "none":
        out[:, :dim].copy_(out_f)
        out[:, dim:].copy_(out_b)
    else:
        torch.add(out_f, out_b, out=out)
        if reduce == "mean":
            out.mul_(0.5)
    return out


@torch.library.custom_op("visionzoo::selective_scan_bidirectional", mutates_args=())
def selective_scan_bidirectional_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                                    z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, reduce: str,
                                    reversed_inputs: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``out`` (see :func:`selective_scan_bidirectional`) and ``last_state (batch, 2 dim, N)``."""
    dim = u.shape[1] // 2
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def run(backend):
        if backend.name == "triton":
            shared_z = z is not None and z.shape[1] == dim
            stacked, last = _triton.selective_scan_triton(
                *args, g_fwd=B.shape[1] // 2, in_rev=not reversed_inputs, z_rev=shared_z or not reversed_inputs,
                z_shift=dim if shared_z else 0)
            return _combine(u, stacked[:, :dim], stacked[:, dim:], reduce), last
        if backend.name == "cpu" and reversed_inputs and (z is None or z.shape[1] == dim):
            # Vim's layout on CPU: the C kernel reads z and writes the output backwards in place for the
            # backward direction and accumulates the two directions (no flipped or stacked copies).
            if not (getattr(_WANT, "on", False) and reduce != "none"):
                return _cpu.selective_scan_bidirectional_cpu(*args, reduce)
            out, last, ck = _cpu.selective_scan_bidirectional_cpu(*args, reduce, checkpoints=True)
            _CHECKPOINTS[id(out)] = ck
            weakref.finalize(out, _CHECKPOINTS.pop, id(out), None)
            return out, last
        stacked, last = backend.forward(*_scan_order(*args[:8], reversed_inputs), delta_softplus)
        return _combine(u, stacked[:, :dim], stacked[:, dim:].flip(-1), reduce), last

    out, last = SCAN.dispatch(backend, u, run, dstate=A.shape[1])
    return out, last.to(compute_dtype(u)).contiguous()


@selective_scan_bidirectional_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reduce, reversed_inputs, backend):
    batch, dim2, length = u.shape
    channels = dim2 if reduce == "none" else dim2 // 2
    out = torch.empty_strided((batch, channels, length), output_strides(u, channels), dtype=u.dtype, device=u.device)
    return out, u.new_empty((batch, dim2, A.shape[1]), dtype=compute_dtype(u))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reduce, reversed_inputs, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.reduce = reduce
    ctx.reversed_inputs = reversed_inputs
    ctx.backend = backend
    ctx.checkpoints = _CHECKPOINTS.pop(id(output[0]), None)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_last_state):
    inputs = ctx.saved_tensors
    u, B, z = inputs[0], inputs[3], inputs[6]
    needs = ctx.needs_input_grad[:8]
    if (grad_out is None and grad_last_state is None) or not any(needs):
        return (None,) * 12
    dim = u.shape[1] // 2
    shared_z = z is not None and z.shape[1] == dim
    reduce, rev_in = ctx.reduce, ctx.reversed_inputs
    scale = 0.5 if reduce == "mean" else 1.0

    def run(backend):
        if backend.name == "triton":  # one launch for both directions
            grads = list(_triton.selective_scan_triton_backward(
                *inputs, ctx.delta_softplus, grad_out, grad_last_state, g_fwd=B.shape[1] // 2,
                in_rev=not rev_in, z_rev=shared_z or not rev_in, z_shift=dim if shared_z else 0,
                dout_shift=0 if reduce == "none" else dim, dout_scale=scale))
            if shared_z and grads[6] is not None:
                grads[6] = grads[6][:, :dim] + grads[6][:, dim:]
            return grads
        if backend.name == "cpu" and rev_in and reduce != "none" and (z is None or shared_z):
            # Vim's layout on CPU: one kernel call per direction, z and grad_out read backwards in place.
            grads = _cpu_bwd.selective_scan_bidirectional_cpu_backward(*inputs, ctx.delta_softplus, grad_out, scale,
                                                                       grad_last_state, ctx.checkpoints)
            if grads is not None:
                return list(grads)
        # One plain backward of the stacked scan (backward half time-reversed), then back to the caller's order.
        if grad_out is None:
            go = None
        elif reduce == "none":
            go = _unflip_half(grad_out, dim)
        else:
            g = grad_out * scale if scale != 1.0 else grad_out
            go = torch.cat([g, g.flip(-1)], dim=1)
        grads = list(backend.backward(_scan_order(*inputs, rev_in), ctx.delta_softplus, go, grad_last_state, needs))
        for i in (0, 1, 3, 4):  # u, delta, B, C
            if needs[i] and grads[i] is not None and not rev_in:
                grads[i] = _unflip_half(grads[i], B.shape[1] // 2 if i in (3, 4) else dim)
        if needs[6] and grads[6] is not None:
            if shared_z:
                grads[6] = grads[6][:, :dim] + grads[6][:, dim:].flip(-1)
            elif not rev_in:
                grads[6] = _unflip_half(grads[6], dim)
        return grads

    grads = SCAN.dispatch(ctx.backend, u, run, dstate=inputs[2].shape[1])
    grads = tuple(g if need else None for g, need in zip(grads, needs))
    return (*grads, None, None, None, None)


selective_scan_bidirectional_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.visionzoo.selective_scan_bidirectional)
def _flop_formula(u_shape, delta_shape, A_shape, B_shape, C_shape, D_shape, z_shape, delta_bias_shape,
                  delta_softplus, reduce, *args, out_shape=None, **kwargs) -> int:
    # The two scans, counted as mamba-ssm counts one (the elementwise average of the two outputs is not
    # counted, as FlopCounterMode counts no elementwise op; this keeps Vim's count what it was).
    batch, dim2, length = u_shape
    return _op.flops(batch, dim2, length, A_shape[1], D_shape is not None, z_shape is not None)


@register_aten_path(selective_scan_bidirectional_op)
def selective_scan_bidirectional_aten(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reduce, reversed_inputs,
                                      backend="auto"):
    """The op in plain aten ops: one ``reference`` scan of the stacked channels, backward half time-reversed."""
    dim = u.shape[1] // 2
    stacked, last = selective_scan_reference(*_scan_order(u, delta, A, B, C, D, z, delta_bias, reversed_inputs),
                                             delta_softplus)
    out_f, out_b = stacked[:, :dim], stacked[:, dim:].flip(-1)
    if reduce == "none":
        return torch.cat([out_f, out_b], dim=1), last
    out = out_f + out_b
    return (out * 0.5 if reduce == "mean" else out), last
