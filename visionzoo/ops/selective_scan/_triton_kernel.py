"""Triton kernel source of the ``triton`` selective-scan backend.

This module imports Triton at its top, so it is only ever imported lazily by :mod:`._triton` (never at
``visionzoo`` import time). The kernel is a plain Python function here; :mod:`._triton` wraps it with
``triton.jit`` when it is first needed, which is when Triton decides (from ``TRITON_INTERPRET``) whether
to compile it or to run it in its CPU interpreter.

One program handles one batch element and a block of ``BLOCK_D`` channels and walks the sequence
sequentially, carrying the state ``h`` (``BLOCK_D x BLOCK_N``) in fp32 registers::

    delta = softplus(delta + delta_bias)                  (bias, softplus optional)
    h     = exp2(delta * A * log2 e) * h + (delta * u) * B_t
    y_t   = sum_n h * C_t ;  out_t = (y_t + D u_t) * silu(z_t)
"""
from __future__ import annotations

import triton.language as tl

LOG2E = 1.4426950408889634


def selective_scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    dim, length, dstate, dg,
    su_b, su_d, su_l,
    sdt_b, sdt_d, sdt_l,
    sz_b, sz_d, sz_l,
    so_b, so_d, so_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = offs_d // dg  # channel d reads group d // (dim // G) of B and C

    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_p = u_ptr + pid_b * su_b + offs_d * su_d
    dt_p = dt_ptr + pid_b * sdt_b + offs_d * sdt_d
    z_p = z_ptr + pid_b * sz_b + offs_d * sz_d
    o_p = out_ptr + pid_b * so_b + offs_d * so_d
    B_p = B_ptr + pid_b * sB_b + group[:, None] * sB_g + offs_n[None, :] * sB_n
    C_p = C_ptr + pid_b * sC_b + group[:, None] * sC_g + offs_n[None, :] * sC_n

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(length):
        u = tl.load(u_p + t * su_l, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dt_p + t * sdt_l, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
        Bt = tl.load(B_p + t * sB_l, mask=mask_dn, other=0.0).to(tl.float32)
        Ct = tl.load(C_p + t * sC_l, mask=mask_dn, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt
        y = tl.sum(h * Ct, axis=1)
        if HAS_D:
            y = y + Dv * u
        if HAS_Z:
            z = tl.load(z_p + t * sz_l, mask=mask_d, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(o_p + t * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)

    last_p = last_ptr + pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    tl.store(last_p, h, mask=mask_dn)
