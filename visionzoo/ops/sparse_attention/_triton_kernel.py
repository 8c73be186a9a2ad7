"""Triton kernel sources of the ``triton`` sparse-attention backend (forward and backward).

Imports Triton at its top, so only :mod:`._triton` imports it, lazily (never at ``visionzoo`` import
time); the kernels are plain functions here and :mod:`._triton` wraps them with ``triton.jit`` on
first use (which is when Triton reads ``TRITON_INTERPRET``).

Layout. ``q``, ``k`` ``(B, H, N, d)``, ``v`` ``(B, H, N, d_v)`` with any strides, ``idx`` ``(B, H, M, K)``
(``M = N - P`` sparse query rows, row ``i`` of ``idx`` belongs to query ``P + i``). Grid of both kernels:
``(cdiv(rows, BLOCK_M), B * H)``; a program owns ``BLOCK_M`` query rows of one (batch, head) and walks
their key sets ``BLOCK_K`` keys at a time. With ``DENSE`` the rows are the ``P`` leading (class-token)
rows and the key set of every row is ``0 .. N - 1``; otherwise it is the row's ``idx``.

Every query row has its own keys, so a block is a gathered ``(BLOCK_M, BLOCK_K, d)`` tile of K (and V):
``s = sum_d q * k_tile`` with fp32 accumulation, an online softmax over the blocks (running max ``m``,
sum ``l``), and ``acc += sum_keys p * v_tile``; the forward stores ``out = acc / l`` in the output dtype
and, on request, ``lse = m + log l`` (fp32).

Backward (one pass per block after a first pass that recomputes ``lse`` from the scores only), with
``delta_i = do_i . o_i`` precomputed by the caller::

    p_ij = exp(s_ij - lse_i)      dp_ij = do_i . v_j      ds_ij = p_ij (dp_ij - delta_i)
    dq_i += scale * ds_ij k_j     dk_j += scale * ds_ij q_i      dv_j += p_ij do_i

``dq`` rows belong to one program (plain store); ``dk``/``dv`` rows are shared by every query that keeps
the key, so they are accumulated with ``atomic_add`` into fp32 buffers (summation order, hence the last
bits, vary from run to run). The running max starts at ``-1e30`` (finite), so rows past the end of the
launch (masked, never stored) produce no NaN.
"""
from __future__ import annotations

import triton.language as tl


def sparse_attn_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    H, N, P, rows, n_keys, scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ib, s_ih, s_im, s_ik,
    s_ob, s_oh, s_on, s_od,
    D, DV,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DENSE: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row within this launch
    row_ok = rm < rows
    if DENSE:
        qrow = rm  # query token index
    else:
        qrow = rm + P
    od = tl.arange(0, BLOCK_D)
    ov = tl.arange(0, BLOCK_DV)
    d_ok = od < D
    v_ok = ov < DV
    qrow64 = qrow.to(tl.int64)

    q = tl.load(Q + b * s_qb + h * s_qh + qrow64[:, None] * s_qn + od[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) - 1.0e30
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (kk < n_keys)[None, :]
        if DENSE:
            kid = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int64) + kk[None, :]
        else:
            kid = tl.load(IDX + b * s_ib + h * s_ih + rm[:, None].to(tl.int64) * s_im + kk[None, :] * s_ik,
                          mask=ok, other=0).to(tl.int64)
        kt = tl.load(K + b * s_kb + h * s_kh + kid[:, :, None] * s_kn + od[None, None, :] * s_kd,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt, axis=2) * scale
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        vt = tl.load(V + b * s_vb + h * s_vh + kid[:, :, None] * s_vn + ov[None, None, :] * s_vd,
                     mask=ok[:, :, None] & v_ok[None, None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt, axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + qrow64[:, None] * s_on + ov[None, :] * s_od,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
    if STORE_LSE:
        tl.store(LSE + pid_bh.to(tl.int64) * N + qrow64, m_i + tl.log(l_safe), mask=row_ok)


def sparse_attn_bwd_kernel(
    Q, K, V, IDX, DO, DELTA, DQ, DK, DV_,
    H, N, P, rows, n_keys, scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ib, s_ih, s_im, s_ik,
    s_ob, s_oh, s_on, s_od,
    D, DV,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DENSE: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """``DO`` has the ``s_o*`` strides; ``DELTA`` is fp32 ``(B*H, N)``; ``DQ``, ``DK`` are fp32 contiguous
    ``(B, H, N, d)`` and ``DV_`` fp32 contiguous ``(B, H, N, d_v)``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row within this launch
    row_ok = rm < rows
    if DENSE:
        qrow = rm  # query token index
    else:
        qrow = rm + P
    od = tl.arange(0, BLOCK_D)
    ov = tl.arange(0, BLOCK_DV)
    d_ok = od < D
    v_ok = ov < DV
    qrow64 = qrow.to(tl.int64)
    bh64 = pid_bh.to(tl.int64)

    q = tl.load(Q + b * s_qb + h * s_qh + qrow64[:, None] * s_qn + od[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    do = tl.load(DO + b * s_ob + h * s_oh + qrow64[:, None] * s_on + ov[None, :] * s_od,
                 mask=row_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.load(DELTA + bh64 * N + qrow64, mask=row_ok, other=0.0)

    # pass 1: log-sum-exp of the row's scores
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) - 1.0e30
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, n_keys, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (kk < n_keys)[None, :]
        if DENSE:
            kid = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int64) + kk[None, :]
        else:
            kid = tl.load(IDX + b * s_ib + h * s_ih + rm[:, None].to(tl.int64) * s_im + kk[None, :] * s_ik,
                          mask=ok, other=0).to(tl.int64)
        kt = tl.load(K + b * s_kb + h * s_kh + kid[:, :, None] * s_kn + od[None, None, :] * s_kd,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(q[:, None, :] * kt, axis=2) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(tl.where(row_ok, l_i, 1.0))

    # pass 2: gradients
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    grad_base = bh64 * N
    for start in range(0, n_keys, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (kk < n_keys)[None, :]
        if DENSE:
            kid = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int64) + kk[None, :]
        else:
            kid = tl.load(IDX + b * s_ib + h * s_ih + rm[:, None].to(tl.int64) * s_im + kk[None, :] * s_ik,
                          mask=ok, other=0).to(tl.int64)
        kt = tl.load(K + b * s_kb + h * s_kh + kid[:, :, None] * s_kn + od[None, None, :] * s_kd,
                     mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        vt = tl.load(V + b * s_vb + h * s_vh + kid[:, :, None] * s_vn + ov[None, None, :] * s_vd,
                     mask=ok[:, :, None] & v_ok[None, None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt, axis=2) * scale
        p = tl.exp(tl.where(ok, s - lse[:, None], float("-inf")))
        dp = tl.sum(do[:, None, :] * vt, axis=2)
        ds = p * (dp - delta[:, None])
        if NEED_DQ:
            dq += tl.sum(ds[:, :, None] * kt, axis=1)
        if NEED_DK:
            tl.atomic_add(DK + (grad_base + kid[:, :, None]) * D + od[None, None, :],
                          ds[:, :, None] * q[:, None, :] * scale, mask=ok[:, :, None] & d_ok[None, None, :])
        if NEED_DV:
            tl.atomic_add(DV_ + (grad_base + kid[:, :, None]) * DV + ov[None, None, :],
                          p[:, :, None] * do[:, None, :], mask=ok[:, :, None] & v_ok[None, None, :])
    if NEED_DQ:
        tl.store(DQ + (grad_base + qrow64[:, None]) * D + od[None, :], dq * scale,
                 mask=row_ok[:, None] & d_ok[None, :])
