"""Selective scan (the S6 layer of Mamba) with interchangeable backends.

Semantics and argument conventions follow ``selective_scan_fn`` of mamba-ssm: Gu & Dao, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752;
https://github.com/state-spaces/mamba (Apache-2.0). For every channel ``d`` and state index ``n``::

    delta = softplus(delta + delta_bias)            # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h_0 = 0)
    y_t   = sum_n C_t[n] * h_t[n]
    out   = (y + D * u) * silu(z)                   # D and z optional

Backends (``backend=`` argument, or ``auto``; ``auto`` can be overridden with the environment
variable ``VISIONZOO_BACKEND_SELECTIVE_SCAN``; the declaration is ``_op.SCAN``, see
:mod:`visionzoo.ops._dispatch`):

``reference``
    mamba-ssm's ``selective_scan_ref`` algorithm: one op per time step. Defines the semantics.
``chunked``
    Pure PyTorch, exact in fp32, any device; the CPU fallback for other dtypes or when no C compiler
    is found. The sequence is cut into blocks
    of ``T`` steps (``T * batch * dim * N`` ~ 2^19 elements). For each block, ``exp(delta A)`` (computed
    as ``exp2`` with ``A`` pre-scaled by ``log2 e``) and ``delta B u`` are written into two small
    preallocated buffers in a time-major ``(T, batch, G, N, dim/G)`` layout, the recurrence is run as
    ``T`` in-place ``addcmul_`` calls on contiguous per-step slices (state carried from block to block),
    and ``y = C . h`` for the block is one ``bmm``. The update is the plain product form, so it cannot
    overflow or underflow where the true recurrence does not (no ``exp(-cumsum)`` rescaling).
    Memory is ``O(batch * dim * (L + N * T))``. The backward is analytic: a reverse scan for the
    adjoint ``dL/dh`` over the same blocks, with states recomputed per block from checkpoints.
``cpu``
    A C kernel (:file:`_cpu_kernel.c`) compiled on first use with the system C compiler and called
    through ctypes: one pass over the sequence per block of 8 channels with the state in registers,
    SIMD over channels, no ``(L, N)`` temporaries. fp32 CPU tensors; the default on CPU. The backward
    is a C reverse scan as well (:file:`_cpu_bwd_kernel.c`; states recomputed per 32-step chunk from
    checkpoints, one work item per (batch, group) so that dB/dC need no atomics). Unavailable (``auto``
    falls back to ``chunked``) without a compiler or with ``VISIONZOO_CPU_KERNELS=0``.
``mamba``
    mamba-ssm's fused CUDA kernel, imported lazily; available only for CUDA tensors when
    ``mamba_ssm`` imports.
``triton``
    Fused Triton kernels (one program per batch element and block of channels of one group, looping
    over ``L`` with the state in fp32 registers; fp32/fp16/bf16 inputs). The backward kernel recomputes
    the states (checkpoints every 16 steps, each chunk re-run into a small per-program scratch buffer,
    then walked backwards with the adjoint; nothing of size ``(batch, dim, L, N)`` is stored).
    Triton is imported lazily; available for CUDA tensors when it imports, and for CPU tensors
    only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).

``auto`` prefers ``mamba``, then ``cpu``, then ``chunked``. ``triton`` is opt-in (``backend="triton"`` or the
environment variable) until it has been measured on a GPU (``benchmarks/gpu_check.sh``).

:func:`bimamba_inner` is a whole Vim mixer between its projections (both directions' convs,
x-projections, ``dt_proj`` and scans, and the gate), and chooses itself: for CPU inference it runs the
fused C path :func:`bimamba_inner_cpu` (convs, x-projections, both scans with ``dt_proj`` folded in, gate;
in place, no autograd; also under CPU autocast, in fp32) when :func:`bimamba_inner_cpu_applies` says so
and the projections are plain ``nn.Linear`` layers; for fp32 CPU training the same C kernels as one autograd
node, :func:`bimamba_train_cpu` (:mod:`._cpu_train`: no glue copies between them; in fp32 under CPU autocast too),
when :func:`bimamba_train_cpu_applies` says so; and the differentiable ops otherwise.

:func:`vim_blocks_cpu` is whole Vim blocks for fp32 CPU inference (RMSNorm, in-projection, the fused mixer,
out-projection, residual add; any number of layers) in one C call, the projections as MKL's packed GEMM from
torch's own library (``nn.Linear``'s product); :func:`vim_blocks_cpu_applies` says when it may run (Vim's model and
blocks also check their modules: plain layers, no hooks).

The scan is the custom op ``torch.ops.visionzoo.selective_scan``: it runs on the meta device, works
under ``torch.compile``, is counted by ``FlopCounterMode`` (mamba-ssm's formula,
:func:`selective_scan_flops`) and is differentiable (``u, delta, A, B, C, D, z, delta_bias``).

:func:`selective_scan_bidirectional` (``torch.ops.visionzoo.selective_scan_bidirectional``, see
:mod:`._bidirectional`) runs both directions of a Vim mixer: one kernel launch with ``triton``, two
scans (the backward one on flipped copies) with every other backend.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from .._checks import check_tensors
from .._dispatch import call, tracing
from ..causal_conv1d import causal_conv1d_bidirectional
from ._bidirectional import REDUCTIONS, keep_checkpoints, selective_scan_bidirectional_op
from . import _cpu_bwd
from ._cpu import MixerDirection, VimBlockWeights, bimamba_inner_cpu, torch_blas, vim_blocks_cpu
from ._cpu_train import bimamba_train_cpu
from ._op import BACKENDS, SCAN, flops as _flops, selective_scan_op

__all__ = ["selective_scan", "selective_scan_bidirectional", "selective_scan_flops", "bimamba_inner", "MambaBranch",
           "BACKENDS", "MixerDirection", "bimamba_inner_cpu", "bimamba_inner_cpu_applies", "bimamba_train_cpu",
           "bimamba_train_cpu_applies", "mixer_direction",
           "VimBlockWeights", "vim_blocks_cpu", "vim_blocks_cpu_applies", "plain_linear"]


# FlopCounterMode pushes a private mode class in recent torch versions, itself in older ones.
_FLOP_COUNTER_MODES = tuple(c for c in (FlopCounterMode, getattr(torch.utils.flop_counter, "_FlopCounterMode", None))
                            if isinstance(c, type))


class _Fp32(NamedTuple):
    """What the fused path computes in: selection asks for fp32 CPU backends."""

    device: torch.device
    dtype: torch.dtype = torch.float32


_FUSED_SELECTED: set[tuple] = set()  # (backend, env switches) for which the fused path was selected


def _cpu_kernels_selected(x: Tensor, backend: str) -> bool:
    """Whether the fused CPU paths may run on ``x``: a plain CPU tensor (not fake or another subclass), no tracer
    (``torch.jit.trace``, export, ``torch.compile``: those see the custom ops instead, and no ctypes kernel may
    run), no ``torch.func`` transform (``grad``, ``vmap``: their wrapped tensors reach the custom ops unwrapped,
    and the training node has no functorch rules), no ``FlopCounterMode`` counting (other dispatch modes, e.g. a
    memory tracker, see their torch ops), and ``backend`` (the mixer's scan backend) selects ``cpu`` for fp32, as
    the causal conv's ``auto`` does."""
    if (type(x) is not torch.Tensor or x.device.type != "cpu" or tracing()
            or torch._C._are_functorch_transforms_active()
            or (torch._C._len_torch_dispatch_stack()
                and any(isinstance(m, _FLOP_COUNTER_MODES) for m in _get_current_dispatch_mode_stack()))):
        return False
    # The selection for an fp32 CPU probe depends on the requested backend and the two ops' environment
    # switches; a positive answer is cached on them (this check runs once per Vim layer: its cost is overhead).
    from ..causal_conv1d._op import CONV

    key = (backend, os.environ.get(SCAN.env_var), os.environ.get(CONV.env_var))
    if key in _FUSED_SELECTED:
        return True
    probe = _Fp32(torch.device("cpu"))
    if SCAN.select(backend, probe) == "cpu" and CONV.select("auto", probe) == "cpu":
        _FUSED_SELECTED.add(key)
        return True
    return False


def bimamba_inner_cpu_applies(x: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`bimamba_inner_cpu` may run a Vim mixer on ``x`` in place of the differentiable ops.

    It does for inference (autograd off) on fp32 tensors or ones produced under CPU autocast (the fused path then
    runs in fp32: its autocast rule is "keep fp32"), where :func:`_cpu_kernels_selected` allows the C kernels.
    """
    return (not torch.is_grad_enabled() and (x.dtype == torch.float32 or torch.is_autocast_enabled("cpu"))
            and _cpu_kernels_selected(x, backend))


def bimamba_train_cpu_applies(x: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`bimamba_train_cpu` (one autograd node over the C kernels) may run a Vim mixer on ``x``:
    with autograd on, for a non-empty contiguous ``x``, fp32 or produced under CPU autocast (the node then runs in
    fp32, as the inference path does), where :func:`_cpu_kernels_selected` allows the C kernels and the backward
    kernel is built."""
    return (torch.is_grad_enabled() and (x.dtype == torch.float32 or (
                torch.is_autocast_enabled("cpu") and x.dtype in (torch.bfloat16, torch.float16)))
            and _cpu_kernels_selected(x, backend) and x.numel() > 0 and x.is_contiguous()
            and _cpu_bwd.load() is not None)


def vim_blocks_cpu_applies(x: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`vim_blocks_cpu` may run whole Vim blocks on ``x``: where :func:`bimamba_inner_cpu_applies`
    says the mixer may (fp32 CPU inference, also under CPU autocast: the blocks then keep fp32, as the fused mixer
    does; with its bf16 projections op by op, a Vim-Ti at 224 was slower than fp32 in one call), with torch's
    MKL found (:func:`._cpu.torch_blas`) and ``rms_norm``'s ``auto`` choosing its C kernel. The caller checks
    that its layers are plain fp32 ``nn.Linear`` and carry no hooks (the call skips them)."""
    from ..rms_norm import _auto_takes_cpu

    return bimamba_inner_cpu_applies(x, backend) and _auto_takes_cpu() and torch_blas() is not None


class MambaBranch(NamedTuple):
    """One direction of a Vim mixer, as its modules hold it (official names in the comments)."""

    conv1d: nn.Module  # conv1d: depthwise nn.Conv1d(E, E, K, groups=E), weight (E, 1, K)
    x_proj: nn.Module  # x_proj: Linear(E, R + 2N, bias=False), or a quantized / wrapped equivalent
    dt_proj: nn.Module  # dt_proj: Linear(R, E)
    A_log: Tensor  # (E, N): A = -exp(A_log)
    D: Tensor  # (E,)


def mixer_direction(branch: MambaBranch) -> MixerDirection:
    """The weights of one direction, as the fused CPU paths take them."""
    return MixerDirection(branch.conv1d.weight, branch.conv1d.bias, branch.x_proj.weight, branch.dt_proj.weight,
                          branch.dt_proj.bias, branch.A_log, branch.D)


def plain_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is a registered tensor (not e.g. a dynamically quantized layer, whose
    ``weight`` is a method). Read from ``_parameters``: ``Module.__getattr__`` is Python, and this runs four
    times per Vim layer."""
    return isinstance(m, nn.Linear) and isinstance(m._parameters.get("weight"), Tensor)


def bimamba_inner(xz: Tensor, forward: MambaBranch, backward: MambaBranch, *, backend: str = "auto") -> Tensor:
    """A Vim mixer (``bimamba_type="v2"``, outputs divided by 2) between its in- and out-projections.

    Args:
        xz: ``(batch, L, 2E)`` in-projection output (x, then the gate z).
        forward, backward: the two directions' modules; the backward direction runs on the time-reversed
            sequence and shares the gate.
        backend: the scan backend (as for :func:`selective_scan`).

    Returns:
        ``(batch, L, E)``: ``(y_f + flip(y_b)) / 2 * silu(z)``. On the fused CPU path (inference) it is a
        view of ``xz``'s memory (``xz`` is consumed); otherwise a new tensor, differentiable.
    """
    plain = all(plain_linear(m) for m in (forward.x_proj, forward.dt_proj, backward.x_proj, backward.dt_proj))
    if plain and forward.x_proj.weight.dtype == torch.float32:
        if bimamba_inner_cpu_applies(xz, backend):
            # Under CPU autocast too: the fused path calls no op that autocast recasts (only casts, views and
            # copies around the C calls), so it runs in fp32 without leaving autocast.
            return bimamba_inner_cpu(xz, mixer_direction(forward), mixer_direction(backward))
        if bimamba_train_cpu_applies(xz, backend) and all(type(b.conv1d) is nn.Conv1d for b in (forward, backward)):
            return bimamba_train_cpu(xz, mixer_direction(forward), mixer_direction(backward))
    # Everything stays time-major, (B, L, channels) in memory, as the Linear layers produce it; the conv
    # and the scan take (B, channels, L) *views* of it, so no transposing copies.
    batch, length, _ = xz.shape
    E, N, R = forward.A_log.shape[0], forward.A_log.shape[1], forward.dt_proj.in_features
    xs, z = xz.split(E, dim=-1)  # (B, L, E) each
    # Backward direction = the time-reversed sequence, stacked as channels E..2E-1 (its causal conv has to
    # see it reversed; the cpu kernel reads xs backwards in place, other backends concatenate a flipped
    # copy). The gate z is shared: the scan reads it time-reversed for that half.
    conv_w = torch.cat([forward.conv1d.weight, backward.conv1d.weight])[:, 0]  # (2E, K)
    conv_b = None if forward.conv1d.bias is None else torch.cat([forward.conv1d.bias, backward.conv1d.bias])
    xs = causal_conv1d_bidirectional(xs.transpose(1, 2), conv_w, conv_b, activation="silu")  # (B, 2E, L) view
    # Per direction, on the (B, L, E) halves of the conv output (strided views: the matmuls read them in
    # place), as nn.Linear / MatMul: one batched einsum over the directions copied its input in eager and
    # was ~5x slower in onnxruntime. Plain projections keep dt_proj's bias apart (the scan adds it, as the
    # official code does); other modules (e.g. dynamically quantized) are called as they are.
    u = xs.transpose(1, 2)  # (B, L, 2E)
    branches = (forward, backward)
    parts = [br.x_proj(u[..., k * E:(k + 1) * E]).split([R, N, N], dim=-1) for k, br in enumerate(branches)]
    if plain:
        dt = torch.cat([F.linear(p[0], br.dt_proj.weight) for br, p in zip(branches, parts)], -1)  # (B, L, 2E)
        dt_bias = torch.cat([forward.dt_proj.bias, backward.dt_proj.bias]).float()  # (2E,)
    else:
        dt = torch.cat([br.dt_proj(p[0]) for br, p in zip(branches, parts)], dim=-1)  # (B, L, 2E)
        dt_bias = None
    B_ssm, C_ssm = (torch.stack([p[i] for p in parts], dim=1) for i in (1, 2))  # (B, 2, L, N)
    A = -torch.exp(torch.cat([forward.A_log, backward.A_log]).float())  # (2E, N)
    D = torch.cat([forward.D, backward.D]).float()  # (2E,)
    # (y + flip(y_b)) / 2 in one call: one kernel launch with the Triton backend, one plain scan of the
    # 2E channels otherwise (B/C: (B, 2, N, L) views, the second group is the backward direction's).
    return selective_scan_bidirectional(
        xs, dt.transpose(1, 2), A, B_ssm.transpose(2, 3), C_ssm.transpose(2, 3), D=D, z=z.transpose(1, 2),
        delta_bias=dt_bias, delta_softplus=True, reduce="mean", reversed_inputs=True, backend=backend,
    ).transpose(1, 2)  # (B, L, E)


def selective_scan_flops(batch: int, dim: int, L: int, N: int, with_D: bool = True, with_z: bool = False) -> int:
    """FLOPs of one selective scan as counted by mamba-ssm: ``9 * batch * L * dim * N``, plus
    ``batch * dim * L`` if ``D`` is given and ``batch * dim * L`` if ``z`` is given.

    (FLOPs, not MACs: the number ``torch.utils.flop_counter.FlopCounterMode`` reports for the op.)
    """
    return _flops(batch, dim, L, N, with_D, with_z)


def _check_groups(name: str, x: Tensor, batch: int, dim: int, dstate: int, length: int) -> Tensor:
    """Validate ``B``/``C`` and return it as ``(batch, G, N, L)``."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() != 4:
        raise ValueError(f"selective_scan: {name} must be (batch, N, L) or (batch, G, N, L), "
                         f"got {x.dim()}-d shape {tuple(x.shape)}")
    if x.shape[0] != batch or x.shape[2] != dstate or x.shape[3] != length:
        raise ValueError(f"selective_scan: {name} has shape {tuple(x.shape)}; expected batch={batch}, "
                         f"N={dstate} (from A), L={length} (from u)")
    groups = x.shape[1]
    if groups < 1 or dim % groups != 0:
        raise ValueError(f"selective_scan: dim={dim} is not divisible by the number of groups G={groups} of {name}")
    return x


def _validate(u, delta, A, B, C, D, z, delta_bias):
    """Check ranks, shapes, dtypes and devices; return ``B, C`` as ``(batch, G, N, L)``."""
    check_tensors("selective_scan", (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                                     ("delta_bias", delta_bias)))
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be 3-d (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1 or dim < 1:
        raise ValueError(f"selective_scan: u must have dim >= 1 and L >= 1, got shape {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta has shape {tuple(delta.shape)}, expected u's shape {tuple(u.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z has shape {tuple(z.shape)}, expected u's shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, N) with dim={dim}, got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    if dstate < 1:
        raise ValueError("selective_scan: A must have N >= 1 state columns")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and x.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must have shape (dim,) = ({dim},), got {tuple(x.shape)}")
    B4 = _check_groups("B", B, batch, dim, dstate, length)
    C4 = _check_groups("C", C, batch, dim, dstate, length)
    if B4.shape[1] != C4.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same number of groups, "
                         f"got G={B4.shape[1]} for B and G={C4.shape[1]} for C")
    return B4, C4


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, backend: str = "auto") -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Selective scan, with the arguments and semantics of mamba-ssm's ``selective_scan_fn``.

    Args:
        u: ``(batch, dim, L)`` input sequence.
        delta: ``(batch, dim, L)`` step sizes (before ``delta_bias`` / softplus).
        A: ``(dim, N)`` real state matrix (diagonal per channel; negative for a stable scan).
        B: ``(batch, N, L)`` or grouped ``(batch, G, N, L)``; channel ``d`` uses group
            ``d // (dim // G)`` (contiguous blocks of channels).
        C: same shape convention as ``B`` (same ``G``).
        D: optional ``(dim,)`` skip connection, ``out += D * u``.
        z: optional ``(batch, dim, L)`` gate, ``out *= silu(z)``.
        delta_bias: optional ``(dim,)`` added to ``delta``.
        delta_softplus: apply ``softplus`` to ``delta`` (after the bias).
        return_last_state: also return the final state.
        backend: ``"auto"``, ``"reference"``, ``"chunked"``, ``"cpu"``, ``"mamba"`` or ``"triton"`` (see the module
            docstring).

    Returns:
        ``out`` ``(batch, dim, L)`` in ``u``'s dtype (internal math in fp32; fp64 for fp64 inputs), or
        ``(out, last_state)`` with ``last_state`` ``(batch, dim, N)`` in fp32 (fp64 for fp64 inputs).
        ``out`` is contiguous, except when ``u`` is a time-major view (``u.permute(2, 0, 1)``
        contiguous, e.g. the transpose of a ``(batch=1, L, dim)`` activation): then ``out`` has the same
        layout, which saves two transposes.

    Raises:
        ValueError: bad ranks/shapes/dtypes/devices, or an unknown backend name.
        RuntimeError: the requested backend is not available (e.g. ``mamba`` on CPU).
    """
    SCAN.check_name(backend)
    B, C = _validate(u, delta, A, B, C, D, z, delta_bias)
    out, last_state = call(selective_scan_op, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), backend)
    return (out, last_state) if return_last_state else out


def selective_scan_bidirectional(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                                 z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                                 delta_softplus: bool = False, return_last_state: bool = False, *, reduce: str = "mean",
                                 reversed_inputs: bool = False, backend: str = "auto") -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Forward and backward-in-time selective scans of stacked channels, combined (Vim's bimamba v2).

    Args:
        u: ``(batch, 2 dim, L)``: channels ``[0, dim)`` are scanned forwards in time, ``[dim, 2 dim)``
            backwards (from ``t = L - 1`` to ``0``); everything is in the original time order.
        delta: ``(batch, 2 dim, L)`` step sizes (before ``delta_bias`` / softplus).
        A: ``(2 dim, N)``.
        B, C: ``(batch, G, N, L)`` with ``G`` even; the first ``G / 2`` groups belong to the forward
            direction (channel ``c`` uses group ``c // (2 dim / G)``).
        D, delta_bias: optional ``(2 dim,)``.
        z: optional gate, ``(batch, dim, L)`` (the same gate for both directions) or ``(batch, 2 dim, L)``.
        delta_softplus, return_last_state: as for :func:`selective_scan`.
        reduce: ``"mean"`` (Vim's ``(y + flip(y_b)) / 2``), ``"sum"`` -> ``(batch, dim, L)``; ``"none"`` ->
            the two directions' outputs stacked, ``(batch, 2 dim, L)``.
        reversed_inputs: the backward direction's ``u, delta, B, C`` (and its half of a ``2 dim``-channel
            ``z``) are given already time-reversed, i.e. computed from the flipped sequence as Vim does
            (its depthwise causal conv must see the flipped sequence). A ``dim``-channel ``z``, the output and
            ``last_state`` stay in the original order / as documented above.
        backend: as for :func:`selective_scan`; ``triton`` runs both directions in one kernel launch, the
            others run one plain scan over the stacked channels, the backward half time-reversed (flipped
            copies of what is not already reversed).

    Returns:
        ``out`` in ``u``'s dtype (time-major strides when ``u`` is a time-major view), or
        ``(out, last_state)`` with ``last_state`` ``(batch, 2 dim, N)`` fp32 (fp64 for fp64 inputs; for the
        backward direction, the state after ``t = 0``).

    Raises:
        ValueError: bad shapes (odd channel count or odd ``G``, ``z`` neither ``dim`` nor ``2 dim`` channels,
            the checks of :func:`selective_scan`), unknown ``reduce`` or backend.
        RuntimeError: the requested backend is not available.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"selective_scan_bidirectional: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    SCAN.check_name(backend, "selective_scan_bidirectional")
    check_tensors("selective_scan_bidirectional", (("u", u), ("z", z)), kind="real floating point")
    if u.dim() == 3 and u.shape[1] % 2:
        raise ValueError(f"selective_scan_bidirectional: u must stack the two directions as 2 * dim channels, "
                         f"got an odd channel count {u.shape[1]}")
    B4, C4 = _validate(u, delta, A, B, C, D, None, delta_bias)
    if z is not None:
        shared = (u.shape[0], u.shape[1] // 2, u.shape[2])
        if z.shape != u.shape and z.shape != shared:
            raise ValueError(f"selective_scan_bidirectional: z has shape {tuple(z.shape)}; expected {shared} "
                             f"(one gate for both directions) or {tuple(u.shape)}")
    if B4.shape[1] % 2:
        raise ValueError(f"selective_scan_bidirectional: B and C need an even number of groups G (the first "
                         f"G/2 for the forward direction), got G={B4.shape[1]}")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B4, C4, D, z, delta_bias))
    with keep_checkpoints(grad):  # the cpu forward's state checkpoints go to the backward
        out, last_state = call(selective_scan_bidirectional_op, u, delta, A, B4, C4, D, z, delta_bias,
                               bool(delta_softplus), reduce, bool(reversed_inputs), backend)
    return (out, last_state) if return_last_state else out
