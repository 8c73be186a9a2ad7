"""Selective scan (the S6 layer of Mamba) with interchangeable backends.

Semantics and argument conventions follow ``selective_scan_fn`` of mamba-ssm: Gu & Dao, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752;
https://github.com/state-spaces/mamba (Apache-2.0). For every channel ``d`` and state index ``n``::

    delta = softplus(delta + delta_bias)            # bias and softplus optional
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h_0 = 0)
    y_t   = sum_n C_t[n] * h_t[n]
    out   = (y + D * u) * silu(z)                   # D and z optional

Backends (``backend=`` argument, or ``auto``; ``auto`` can be overridden with the environment
variable ``VISIONZOO_BACKEND_SELECTIVE_SCAN``, see :mod:`visionzoo.ops._backend`):

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

:func:`bimamba_inner_cpu` is the CPU inference path of a whole Vim mixer between its projections (convs,
x-projections, both scans with ``dt_proj`` folded in, gate; in place, no autograd); models take it when
:func:`bimamba_inner_cpu_applies` says so, and the differentiable ops otherwise.

The scan is the custom op ``torch.ops.visionzoo.selective_scan``: it runs on the meta device, works
under ``torch.compile``, is counted by ``FlopCounterMode`` (mamba-ssm's formula,
:func:`selective_scan_flops`) and is differentiable (``u, delta, A, B, C, D, z, delta_bias``).

:func:`selective_scan_bidirectional` (``torch.ops.visionzoo.selective_scan_bidirectional``, see
:mod:`._bidirectional`) runs both directions of a Vim mixer: one kernel launch with ``triton``, two
scans (the backward one on flipped copies) with every other backend.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from .._backend import resolve_backend
from ._bidirectional import selective_scan_bidirectional
from ._cpu import MixerDirection, bimamba_inner_cpu
from ._op import AUTO_ORDER, BACKENDS, flops as _flops, is_available as _is_available, selective_scan_op

__all__ = ["selective_scan", "selective_scan_bidirectional", "selective_scan_flops", "BACKENDS",
           "MixerDirection", "bimamba_inner_cpu", "bimamba_inner_cpu_applies"]


# FlopCounterMode pushes a private mode class in recent torch versions, itself in older ones.
_FLOP_COUNTER_MODES = tuple(c for c in (FlopCounterMode, getattr(torch.utils.flop_counter, "_FlopCounterMode", None))
                            if isinstance(c, type))


def bimamba_inner_cpu_applies(x: Tensor, backend: str = "auto") -> bool:
    """Whether :func:`bimamba_inner_cpu` may run a Vim mixer on ``x`` in place of the differentiable ops.

    It does for inference (autograd off, no autocast) on plain fp32 CPU tensors (not fake or other
    subclasses) when ``backend`` (the mixer's scan backend) resolves to ``cpu``, and the causal conv's
    ``auto`` does too. It does not while ``torch.compile`` traces or ``FlopCounterMode`` counts: those
    see the custom ops instead. Other dispatch modes (e.g. a memory tracker) see its torch ops.
    """
    if (torch.is_grad_enabled() or type(x) is not torch.Tensor or x.device.type != "cpu"
            or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or any(isinstance(m, _FLOP_COUNTER_MODES) for m in _get_current_dispatch_mode_stack())):
        return False
    from ..causal_conv1d import AUTO_ORDER as CONV_AUTO, BACKENDS as CONV_BACKENDS, _is_available as conv_ok
    return (resolve_backend("selective_scan", backend, "cpu", BACKENDS, AUTO_ORDER, _is_available) == "cpu"
            and resolve_backend("causal_conv1d", "auto", "cpu", CONV_BACKENDS, CONV_AUTO, conv_ok) == "cpu")


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
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, x in named.items():
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise ValueError(f"selective_scan: complex {name} is not supported (real-valued scan only)")
        if not x.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating point tensor, got {x.dtype}")
        if x.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {x.device} but u is on {u.device}")
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


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
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
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; known backends: auto, {', '.join(BACKENDS)}")
    if not isinstance(u, Tensor):
        raise TypeError(f"selective_scan: u must be a torch.Tensor, got {type(u).__name__}")
    B, C = _validate(u, delta, A, B, C, D, z, delta_bias)
    out, last_state = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), backend)
    return (out, last_state) if return_last_state else out
