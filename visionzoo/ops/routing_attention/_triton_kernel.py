"""Triton kernel sources of the ``triton`` BRA backend: gather fused into flash attention, forward and
backward.

This module imports Triton at its top, so it is only ever imported lazily by :mod:`._triton` (never at
``visionzoo`` import time). The kernels are plain Python functions; :mod:`._triton` wraps them with
``triton.jit`` when first needed (per device type, so the CPU interpreter and the GPU compiler each
get their own wrapping).

Addressing. Every kernel reads the spatial ``(B, H, W, C)`` tensors the model holds, through their
strides (unit channel stride): token ``t`` of region ``r`` (regions row-major over ``n_h x n_w``,
tokens row-major inside the ``rh x rw`` region) of head ``h`` sits at row ``(r // n_w) * rh + t // rw``,
column ``(r % n_w) * rw + t % rw``, channels ``[h * d, (h + 1) * d)``. The routed key tokens of a query
region are numbered ``j * w2 + t`` for its ``j``-th routed region ``idx[b, r, j]``, so a key tile of
``BLOCK_N`` spans several small regions (4-token regions do not waste a 16-wide tile). Nothing is
gathered into memory: the "gather" is this address computation.

Forward (grid ``(cdiv(w2, BLOCK_M), S2, B * m)``): one program owns ``BLOCK_M`` query tokens of one
region and head, and runs the online-softmax loop of flash attention over the ``topk * w2`` routed keys
(scores in the base-2 domain: ``s = (q . k) * scale * log2 e``). It writes the output and the row
statistic ``lse = max + log2(sum)`` (base 2, fp32, ``(B, H, W, m)``) for the backward.

Backward (recompute from ``lse``; ``delta = rowsum(dO * O)`` per token and head comes from PyTorch):

* ``dq`` kernel, the forward's grid: ``dS = P * (dO V^T - delta)``, ``dq = scale * dS K``;
* ``dk/dv`` kernel, grid ``(cdiv(w2, BLOCK_N), S2, B * m)``: one program owns ``BLOCK_N`` tokens of one
  *key* region and loops over the query regions routed to it, from the inverse routing in CSR form
  (``offsets[b, r] .. offsets[b, r + 1]`` into ``inverse[b]``, built by :mod:`._triton` with a sort):
  ``dv = P^T dO``, ``dk = scale * dS^T Q``. Each key region has its own program: no atomics, and the
  result is deterministic.

Matmuls go through ``tl.dot`` (tiles padded to at least 16, masked); fp32 inputs use
``input_precision=PRECISION`` ("ieee" unless PyTorch allows TF32), fp16/bf16 multiply in their own
type and accumulate in fp32. ``UPCAST`` converts every loaded operand to fp32 first: set only for
bf16 in Triton's CPU interpreter, whose bf16 ``tl.dot`` returns wrong values (Triton 3.8); on a GPU
bf16 runs natively, so the bf16 dot itself is only checked by the CUDA test.
"""
from __future__ import annotations

import triton.language as tl

LOG2E = 1.4426950408889634


def bra_fwd_kernel(
    Q, K, V, OUT, LSE, IDX,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_w, sv_b, sv_h, sv_w, so_b, so_h, so_w, sl_b, sl_h, sl_w,
    n_w, rh, rw, S2, topk, heads, d_qk, d_v, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    w2 = rh * rw
    n_keys = topk * w2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < w2
    qy = (r // n_w) * rh + offs_m // rw
    qx = (r % n_w) * rw + offs_m % rw
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < d_qk
    dv_ok = offs_dv < d_v

    q = tl.load(Q + b * sq_b + qy[:, None] * sq_h + qx[:, None] * sq_w + h * d_qk + offs_dq[None, :],
                mask=m_ok[:, None] & dq_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_DQK)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    idx_row = IDX + (b * S2 + r) * topk
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kr = tl.load(idx_row + offs_n // w2, mask=n_ok, other=0)
        t = offs_n % w2
        ky = (kr // n_w) * rh + t // rw
        kx = (kr % n_w) * rw + t % rw
        kt = tl.load(K + b * sk_b + ky[None, :] * sk_h + kx[None, :] * sk_w + h * d_qk + offs_dq[:, None],
                     mask=n_ok[None, :] & dq_ok[:, None], other=0.0)  # (BLOCK_DQK, BLOCK_N)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * sv_b + ky[:, None] * sv_h + kx[:, None] * sv_w + h * d_v + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(OUT + b * so_b + qy[:, None] * so_h + qx[:, None] * so_w + h * d_v + offs_dv[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + b * sl_b + qy * sl_h + qx * sl_w + h, m_i + tl.log2(l_i), mask=m_ok)


def bra_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_w, sv_b, sv_h, sv_w, sdo_b, sdo_h, sdo_w, sl_b, sl_h, sl_w,
    sdq_b, sdq_h, sdq_w,
    n_w, rh, rw, S2, topk, heads, d_qk, d_v, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    w2 = rh * rw
    n_keys = topk * w2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < w2
    qy = (r // n_w) * rh + offs_m // rw
    qx = (r % n_w) * rw + offs_m % rw
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < d_qk
    dv_ok = offs_dv < d_v

    q = tl.load(Q + b * sq_b + qy[:, None] * sq_h + qx[:, None] * sq_w + h * d_qk + offs_dq[None, :],
                mask=m_ok[:, None] & dq_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdo_b + qy[:, None] * sdo_h + qx[:, None] * sdo_w + h * d_v + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(LSE + b * sl_b + qy * sl_h + qx * sl_w + h, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + b * sl_b + qy * sl_h + qx * sl_w + h, mask=m_ok, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    idx_row = IDX + (b * S2 + r) * topk
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kr = tl.load(idx_row + offs_n // w2, mask=n_ok, other=0)
        t = offs_n % w2
        ky = (kr // n_w) * rh + t // rw
        kx = (kr % n_w) * rw + t % rw
        kt = tl.load(K + b * sk_b + ky[None, :] * sk_h + kx[None, :] * sk_w + h * d_qk + offs_dq[:, None],
                     mask=n_ok[None, :] & dq_ok[:, None], other=0.0)  # (BLOCK_DQK, BLOCK_N)
        vt = tl.load(V + b * sv_b + ky[None, :] * sv_h + kx[None, :] * sv_w + h * d_v + offs_dv[:, None],
                     mask=n_ok[None, :] & dv_ok[:, None], other=0.0)  # (BLOCK_DV, BLOCK_N)
        if UPCAST:
            kt, vt = kt.to(tl.float32), vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    tl.store(DQ + b * sdq_b + qy[:, None] * sdq_h + qx[:, None] * sdq_w + h * d_qk + offs_dq[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & dq_ok[None, :])


def bra_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, OFFSETS, INVERSE,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_w, sv_b, sv_h, sv_w, sdo_b, sdo_h, sdo_w, sl_b, sl_h, sl_w,
    sdk_b, sdk_h, sdk_w, sdv_b, sdv_h, sdv_w,
    n_w, rh, rw, S2, topk, heads, d_qk, d_v, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    r = tl.program_id(1)  # the key region
    bh = tl.program_id(2)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    w2 = rh * rw

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < w2
    ky = (r // n_w) * rh + offs_n // rw
    kx = (r % n_w) * rw + offs_n % rw
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq_ok = offs_dq < d_qk
    dv_ok = offs_dv < d_v

    k = tl.load(K + b * sk_b + ky[:, None] * sk_h + kx[:, None] * sk_w + h * d_qk + offs_dq[None, :],
                mask=n_ok[:, None] & dq_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DQK)
    v = tl.load(V + b * sv_b + ky[:, None] * sv_h + kx[:, None] * sv_w + h * d_v + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_DV)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)

    start = tl.load(OFFSETS + b * (S2 + 1) + r)
    end = tl.load(OFFSETS + b * (S2 + 1) + r + 1)
    for i in range(start, end):
        qr = tl.load(INVERSE + b * (S2 * topk) + i)  # a query region routed to this key region
        for m0 in range(0, w2, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < w2
            qy = (qr // n_w) * rh + offs_m // rw
            qx = (qr % n_w) * rw + offs_m % rw
            q = tl.load(Q + b * sq_b + qy[:, None] * sq_h + qx[:, None] * sq_w + h * d_qk + offs_dq[None, :],
                        mask=m_ok[:, None] & dq_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_DQK)
            do = tl.load(DO + b * sdo_b + qy[:, None] * sdo_h + qx[:, None] * sdo_w + h * d_v + offs_dv[None, :],
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_DV)
            lse = tl.load(LSE + b * sl_b + qy * sl_h + qx * sl_w + h, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + b * sl_b + qy * sl_h + qx * sl_w + h, mask=m_ok, other=0.0)
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            pt = tl.where(m_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    tl.store(DK + b * sdk_b + ky[:, None] * sdk_h + kx[:, None] * sdk_w + h * d_qk + offs_dq[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & dq_ok[None, :])
    tl.store(DV + b * sdv_b + ky[:, None] * sdv_h + kx[:, None] * sdv_w + h * d_v + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])
