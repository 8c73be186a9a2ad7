"""Triton kernel source of the ``triton`` ``na2d_av`` backend (forward, grad of ``attn``, grad of ``value``).

This module imports Triton at its top, so it is only ever imported lazily by :mod:`._triton` (never at
``visionzoo`` import time). The kernels are plain Python functions here; :mod:`._triton` wraps them with
``triton.jit`` on first use, which is when Triton decides (from ``TRITON_INTERPRET``) whether to compile
them or to run them in its CPU interpreter.

Every tensor is addressed through its five strides ``(b, g, h, w, last)``, so permuted views (ContMix's
value is a view of an NCHW map, channel stride ``H*W``) are read in place. A program handles one
``(image, group)`` pair (``pid 0 = b * G + g``) and a block of ``BLOCK_P`` flattened pixels; math is in
fp32 registers whatever the input dtype.

Forward and ``d attn`` (query-centric)
    Each query pixel ``(i, j)`` computes its own clamped window start ``s(i) = clamp(i - K//2, 0, H-K)``
    and loops over the ``K*K`` taps: ``acc += attn[p, t] * value[s(i)+a, s(j)+b, :]`` (forward) or
    ``d attn[p, t] = sum_c d out[p, c] * value[s(i)+a, s(j)+b, c]`` (backward; the ``d out`` tile is
    loaded once when all channels fit one block, ``ONE_CHUNK``).

``d value`` (key-centric, the inverse-neighbourhood gather)
    ``d value[y, x] = sum over the queries (i, j) whose window holds (y, x) of
    attn[i, j, (y - s(i)) * K + (x - s(j))] * d out[i, j]``. Because ``s`` is non-decreasing, the queries
    that see key row ``y`` are one contiguous range ``[i_lo(y), i_hi(y)]``::

        i_lo(y) = 0                       if y <= K - 1   else  y - K + 1 + K // 2
        i_hi(y) = H - 1                   if y >= H - K   else  y + K // 2

    (``K`` queries in the interior, up to ``K + K//2`` next to a border, where the clamped windows pile
    up). Each program loops over ``max(i_hi - i_lo + 1)`` x ``max(j_hi - j_lo + 1)`` of its block
    (runtime bounds; lanes past their own range are masked). Every output element is written once by
    one program: no atomics, deterministic, no zero-initialised buffer. The alternative, a scatter of
    ``attn * d out`` into ``d value`` with ``K*K*c`` fp32 atomic adds per pixel, would be
    non-deterministic and costs ``K*K*c`` atomics per pixel against the gather's ~``K*K`` masked loads.
"""
from __future__ import annotations

import triton.language as tl


def na2d_av_fwd_kernel(
    attn_ptr, v_ptr, out_ptr,
    G, H, W, C,
    sa_b, sa_g, sa_h, sa_w, sa_t,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    so_b, so_g, so_h, so_w, so_c,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_pc = mask_p[:, None] & (offs_c < C)[None, :]
    i = offs_p // W
    j = offs_p % W
    si = tl.minimum(tl.maximum(i - K // 2, 0), H - K)
    sj = tl.minimum(tl.maximum(j - K // 2, 0), W - K)

    a_p = attn_ptr + b * sa_b + g * sa_g + i * sa_h + j * sa_w  # (BLOCK_P,) this pixel's weights
    v_p = v_ptr + b * sv_b + g * sv_g + offs_c[None, :] * sv_c  # (1, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in range(K):
        row_p = v_p + (si + a)[:, None] * sv_h
        for bb in range(K):
            w = tl.load(a_p + (a * K + bb) * sa_t, mask=mask_p, other=0.0).to(tl.float32)
            v = tl.load(row_p + (sj + bb)[:, None] * sv_w, mask=mask_pc, other=0.0).to(tl.float32)
            acc += w[:, None] * v
    o_p = out_ptr + b * so_b + g * so_g + i[:, None] * so_h + j[:, None] * so_w + offs_c[None, :] * so_c
    tl.store(o_p, acc.to(out_ptr.dtype.element_ty), mask=mask_pc)


def na2d_av_bwd_attn_kernel(
    go_ptr, v_ptr, ga_ptr,
    G, H, W, C,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    sa_b, sa_g, sa_h, sa_w, sa_t,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    i = offs_p // W
    j = offs_p % W
    si = tl.minimum(tl.maximum(i - K // 2, 0), H - K)
    sj = tl.minimum(tl.maximum(j - K // 2, 0), W - K)

    g_p = go_ptr + b * sg_b + g * sg_g + i[:, None] * sg_h + j[:, None] * sg_w  # (BLOCK_P, 1)
    v_p = v_ptr + b * sv_b + g * sv_g
    ga_p = ga_ptr + b * sa_b + g * sa_g + i * sa_h + j * sa_w  # (BLOCK_P,)
    if ONE_CHUNK:  # every channel in one block: d out is loaded once
        mask_pc = mask_p[:, None] & (offs_c < C)[None, :]
        go = tl.load(g_p + offs_c[None, :] * sg_c, mask=mask_pc, other=0.0).to(tl.float32)
    for a in range(K):
        row_p = v_p + (si + a)[:, None] * sv_h
        for bb in range(K):
            col_p = row_p + (sj + bb)[:, None] * sv_w
            if ONE_CHUNK:
                v = tl.load(col_p + offs_c[None, :] * sv_c, mask=mask_pc, other=0.0).to(tl.float32)
                s = tl.sum(go * v, axis=1)
            else:
                s = tl.zeros((BLOCK_P,), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    m = mask_p[:, None] & (cc < C)[None, :]
                    gc = tl.load(g_p + cc[None, :] * sg_c, mask=m, other=0.0).to(tl.float32)
                    vc = tl.load(col_p + cc[None, :] * sv_c, mask=m, other=0.0).to(tl.float32)
                    s += tl.sum(gc * vc, axis=1)
            tl.store(ga_p + (a * K + bb) * sa_t, s.to(ga_ptr.dtype.element_ty), mask=mask_p)


def na2d_av_bwd_value_kernel(
    attn_ptr, go_ptr, gv_ptr,
    G, H, W, C,
    sa_b, sa_g, sa_h, sa_w, sa_t,
    sg_b, sg_g, sg_h, sg_w, sg_c,
    sv_b, sv_g, sv_h, sv_w, sv_c,
    K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_bg = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # key pixels
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    y = offs_p // W
    x = offs_p % W
    R = K // 2
    # The queries whose window holds key row y (column x) are rows i_lo..i_hi (columns j_lo..j_hi).
    i_lo = tl.where(y <= K - 1, 0, y - K + 1 + R)
    i_hi = tl.where(y >= H - K, H - 1, y + R)
    j_lo = tl.where(x <= K - 1, 0, x - K + 1 + R)
    j_hi = tl.where(x >= W - K, W - 1, x + R)
    n_i = tl.max(tl.where(mask_p, i_hi - i_lo + 1, 0), axis=0)
    n_j = tl.max(tl.where(mask_p, j_hi - j_lo + 1, 0), axis=0)

    a_p = attn_ptr + b * sa_b + g * sa_g
    g_p = go_ptr + b * sg_b + g * sg_g + offs_c[None, :] * sg_c  # (1, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for di in range(n_i):
        i = i_lo + di
        ok_i = mask_p & (i <= i_hi)
        ta = y - tl.minimum(tl.maximum(i - R, 0), H - K)  # the key's tap row in query row i's window
        for dj in range(n_j):
            j = j_lo + dj
            ok = ok_i & (j <= j_hi)
            tb = x - tl.minimum(tl.maximum(j - R, 0), W - K)
            w = tl.load(a_p + i * sa_h + j * sa_w + (ta * K + tb) * sa_t, mask=ok, other=0.0).to(tl.float32)
            go = tl.load(g_p + i[:, None] * sg_h + j[:, None] * sg_w, mask=ok[:, None] & mask_c[None, :],
                         other=0.0).to(tl.float32)
            acc += w[:, None] * go
    o_p = gv_ptr + b * sv_b + g * sv_g + y[:, None] * sv_h + x[:, None] * sv_w + offs_c[None, :] * sv_c
    tl.store(o_p, acc.to(gv_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])
