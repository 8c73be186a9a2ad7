"""Triton kernel sources of the ``triton`` selective-scan backend (forward and backward).

This module imports Triton at its top, so it is only ever imported lazily by :mod:`._triton` (never at
``visionzoo`` import time). The kernels are plain Python functions here; :mod:`._triton` wraps them with
``triton.jit`` when they are first needed, which is when Triton decides (from ``TRITON_INTERPRET``)
whether to compile them or to run them in its CPU interpreter.

Grid of both kernels: ``(batch, G, cdiv(dim // G, BLOCK_D))``. One program owns one batch element and
a block of ``BLOCK_D`` channels *inside one group* of ``B``/``C`` (so ``B_t`` and ``C_t`` are one
``(N,)`` vector per step, and the per-program partial sums of ``dB``/``dC`` belong to one group). It
walks the sequence with the state ``h`` (``BLOCK_D x BLOCK_N``) in fp32 registers::

    delta = softplus(delta + delta_bias)                  (bias, softplus optional)
    h     = exp2(delta * A * log2 e) * h + (delta * u) * B_t
    y_t   = sum_n h * C_t ;  out_t = (y_t + D u_t) * silu(z_t)

Direction. Groups ``g >= g_fwd`` run *backwards in time*: at step ``t`` their program writes ``out``
(reads ``grad_out``) at memory time index ``L - 1 - t`` (the scan of the time-reversed sequence, written
back in the original order). Its inputs ``u, delta, B, C`` are read at ``L - 1 - t`` too when ``IN_REV``
is set (inputs given in the original order), at ``t`` otherwise (inputs given already time-reversed,
as Vim computes them from the flipped sequence); ``z`` at ``L - 1 - t`` when ``Z_REV`` is set. With
``g_fwd = G`` (the plain scan) every program runs forwards. The fused bidirectional scan stacks the two
directions as channels ``[0, dim)`` and ``[dim, 2 dim)`` with ``G`` even and ``g_fwd = G / 2``;
``z_shift``/``dout_shift`` let the backward direction read channel ``c - shift`` of a ``z``/``grad_out``
that has only ``dim`` channels (shared by both directions: no flipped or stacked copies).

Backward (recompute, nothing of size ``(batch, dim, L, N)`` is stored):

1. a forward pass recomputes the states and stores the state at the start of every chunk of
   ``CHUNK`` steps (``ckpt``: ``cdiv(L, CHUNK)`` states per program);
2. the chunks are visited last to first: the chunk's states are recomputed from its checkpoint into a
   per-program scratch buffer of ``CHUNK + 1`` states (cache resident), then walked backwards with the
   adjoint ``g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` (``g_{L-1}`` starts from the
   gradient of ``last_state``). Per step::

       dC_t  = sum_d dy_t h_t           dB_t = sum_d g_t (delta u)_t       (partials per program)
       d(delta u)_t = sum_n g_t B_t     X_t  = g_t exp(delta_t A) h_{t-1}
       d delta_t = sum_n X_t A + d(delta u)_t u_t     dA += X_t delta_t

Reductions over programs are per-program partials written to separate slots and summed by torch in
:mod:`._triton` (deterministic, no atomics): ``dA`` per batch element, ``dD``/``d delta_bias`` per batch
element, ``dB``/``dC`` per (batch, group, channel block).
"""
from __future__ import annotations

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a plain global is not readable from a compiled kernel


def selective_scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    length, dstate, dg, g_fwd, z_shift,
    su_b, su_d, su_l,
    sdt_b, sdt_d, sdt_l,
    sz_b, sz_d, sz_l,
    so_b, so_d, so_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sl_b, sl_d, sl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    IN_REV: tl.constexpr, Z_REV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # channel inside the group
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_c < dg
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_d = grp * dg + offs_c
    rev = grp >= g_fwd
    # Memory time index at step t: base + stride * t, for the inputs, the output and z (see the docstring).
    o0 = tl.where(rev, length - 1, 0)
    ostep = tl.where(rev, -1, 1)
    if IN_REV:
        t0 = o0
        step = ostep
    else:
        t0 = 0
        step = 1
    if Z_REV:
        z0 = o0
        zstep = ostep
    else:
        z0 = 0
        zstep = 1
    zc = offs_d - tl.where(rev, z_shift, 0)

    A2 = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0)
    A2 = A2.to(tl.float32) * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_p = u_ptr + pid_b * su_b + offs_d * su_d
    dt_p = dt_ptr + pid_b * sdt_b + offs_d * sdt_d
    z_p = z_ptr + pid_b * sz_b + zc * sz_d
    o_p = out_ptr + pid_b * so_b + offs_d * so_d
    B_p = B_ptr + pid_b * sB_b + grp * sB_g + offs_n * sB_n
    C_p = C_ptr + pid_b * sC_b + grp * sC_g + offs_n * sC_n

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(length):
        tm = (t0 + step * t).to(tl.int64)  # memory time index
        u = tl.load(u_p + tm * su_l, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dt_p + tm * sdt_l, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
        Bt = tl.load(B_p + tm * sB_l, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_p + tm * sC_l, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y = y + Dv * u
        if HAS_Z:
            z = tl.load(z_p + (z0 + zstep * t).to(tl.int64) * sz_l, mask=mask_d, other=0.0).to(tl.float32)
            y = y * (z * tl.sigmoid(z))
        tl.store(o_p + (o0 + ostep * t).to(tl.int64) * so_l, y.to(out_ptr.dtype.element_ty), mask=mask_d)

    last_p = last_ptr + pid_b * sl_b + offs_d[:, None] * sl_d + offs_n[None, :] * sl_n
    tl.store(last_p, h, mask=mask_dn)


def selective_scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, ckpt_ptr, scratch_ptr,
    length, dstate, dg, g_fwd, z_shift, dout_shift, dout_scale, dim, nblk, nchunks,
    su_b, su_d, su_l,
    sdt_b, sdt_d, sdt_l,
    sz_b, sz_d, sz_l,
    sdo_b, sdo_d, sdo_l,
    sdu_b, sdu_d, sdu_l,
    sddt_b, sddt_d, sddt_l,
    sdz_b, sdz_d, sdz_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sdl_b, sdl_d, sdl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DOUT: tl.constexpr, HAS_DLAST: tl.constexpr, IN_REV: tl.constexpr, Z_REV: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_groups = tl.num_programs(1)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_c < dg
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    offs_d = grp * dg + offs_c
    rev = grp >= g_fwd
    # Memory time index at step t: base + stride * t, for the inputs, the output and z (see the docstring).
    o0 = tl.where(rev, length - 1, 0)
    ostep = tl.where(rev, -1, 1)
    if IN_REV:
        t0 = o0
        step = ostep
    else:
        t0 = 0
        step = 1
    if Z_REV:
        z0 = o0
        zstep = ostep
    else:
        z0 = 0
        zstep = 1
    zc = offs_d - tl.where(rev, z_shift, 0)
    oc = offs_d - tl.where(rev, dout_shift, 0)
    prog = (pid_b * n_groups + grp) * nblk + pid_d  # slot of this program in ckpt / scratch / partials
    dn_offs = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]  # one packed (BLOCK_D, BLOCK_N) state

    A = tl.load(A_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_p = u_ptr + pid_b * su_b + offs_d * su_d
    dt_p = dt_ptr + pid_b * sdt_b + offs_d * sdt_d
    B_p = B_ptr + pid_b * sB_b + grp * sB_g + offs_n * sB_n
    C_p = C_ptr + pid_b * sC_b + grp * sC_g + offs_n * sC_n
    ck_p = ckpt_ptr + prog * nchunks * (BLOCK_D * BLOCK_N) + dn_offs
    sc_p = scratch_ptr + prog * (CHUNK + 1) * (BLOCK_D * BLOCK_N) + dn_offs

    # Pass 1: recompute the states, keep the one at the start of every chunk.
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range((nchunks - 1) * CHUNK):
        if t % CHUNK == 0:
            tl.store(ck_p + (t // CHUNK) * (BLOCK_D * BLOCK_N), h)
        tm = (t0 + step * t).to(tl.int64)
        u = tl.load(u_p + tm * su_l, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(dt_p + tm * sdt_l, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
        Bt = tl.load(B_p + tm * sB_l, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
    tl.store(ck_p + (nchunks - 1) * (BLOCK_D * BLOCK_N), h)
    tl.debug_barrier()

    # Pass 2: chunks last to first.
    if HAS_DLAST:
        gc = tl.load(dlast_ptr + pid_b * sdl_b + offs_d[:, None] * sdl_d + offs_n[None, :] * sdl_n,
                     mask=mask_dn, other=0.0).to(tl.float32)
    else:
        gc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # exp(delta_{t+1} A) g_{t+1}
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    part = (prog * BLOCK_N + offs_n) * length  # row of this program's dB/dC partials, (n, L) per slot
    for kk in range(nchunks):
        k = nchunks - 1 - kk
        s = k * CHUNK
        n_steps = tl.minimum(length - s, CHUNK)
        # Recompute the chunk's states into the scratch rows 0 (state before the chunk) .. n_steps.
        h = tl.load(ck_p + k * (BLOCK_D * BLOCK_N))
        tl.store(sc_p, h)
        for i in range(n_steps):
            tm = (t0 + step * (s + i)).to(tl.int64)
            u = tl.load(u_p + tm * su_l, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dt_p + tm * sdt_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
            Bt = tl.load(B_p + tm * sB_l, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(sc_p + (i + 1) * (BLOCK_D * BLOCK_N), h)
        tl.debug_barrier()
        # Walk the chunk backwards; h holds h_t.
        for j in range(n_steps):
            i = n_steps - 1 - j
            tm = (t0 + step * (s + i)).to(tl.int64)
            to = (o0 + ostep * (s + i)).to(tl.int64)
            tz = (z0 + zstep * (s + i)).to(tl.int64)
            h_prev = tl.load(sc_p + i * (BLOCK_D * BLOCK_N))
            u = tl.load(u_p + tm * su_l, mask=mask_d, other=0.0).to(tl.float32)
            dt_pre = tl.load(dt_p + tm * sdt_l, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_pre = dt_pre + bias
            if SOFTPLUS:
                dt = tl.where(dt_pre > 20.0, dt_pre, tl.log(1.0 + tl.exp(tl.minimum(dt_pre, 20.0))))
            else:
                dt = dt_pre
            Bt = tl.load(B_p + tm * sB_l, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_p + tm * sC_l, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_DOUT:
                dout = tl.load(dout_ptr + pid_b * sdo_b + oc * sdo_d + to * sdo_l,
                               mask=mask_d, other=0.0).to(tl.float32) * dout_scale
            else:
                dout = tl.zeros((BLOCK_D,), dtype=tl.float32)
            # Output stage: out = (y + D u) * silu(z); dy = d out / d y.
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * sz_b + zc * sz_d + tz * sz_l, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y = y + Dv * u
                dz = dout * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + pid_b * sdz_b + offs_d * sdz_d + tz * sdz_l,
                         dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dout * z * sig
            else:
                dy = dout
            if HAS_D:
                dD_acc += dy * u
                du = dy * Dv
            else:
                du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            g = gc + dy[:, None] * Ct[None, :]  # g_t
            dA_t = tl.exp2(dt[:, None] * A2)
            dC = tl.sum(tl.where(mask_dn, dy[:, None] * h, 0.0), axis=0)
            dB = tl.sum(tl.where(mask_dn, g * (dt * u)[:, None], 0.0), axis=0)
            tl.store(dC_ptr + part + tm, dC, mask=mask_n)
            tl.store(dB_ptr + part + tm, dB, mask=mask_n)
            ddu = tl.sum(g * Bt[None, :], axis=1)
            X = tl.where(mask_dn, g * dA_t * h_prev, 0.0)
            ddt = tl.sum(X * A, axis=1) + ddu * u
            dA_acc += X * dt[:, None]
            du += ddu * dt
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(dt_pre)
            dbias_acc += ddt
            tl.store(du_ptr + pid_b * sdu_b + offs_d * sdu_d + tm * sdu_l, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddt_ptr + pid_b * sddt_b + offs_d * sddt_d + tm * sddt_l,
                     ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            gc = dA_t * g
            h = h_prev
        tl.debug_barrier()

    tl.store(dA_ptr + pid_b * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)
