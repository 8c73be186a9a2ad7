/* Selective-scan backward for the CPU, compiled on first use by visionzoo/ops/selective_scan/_cpu_bwd.py.
 *
 * Plain C called through ctypes, in the style of _cpu_kernel.c (vectors of VZ_CB = 16 channels with AVX-512, else
 * 8; exp2 / softplus / SiLU from _simd.h, flush-to-zero while it runs). Semantics (the reference backend's):
 *   delta' = softplus(delta + bias)                (softplus optional; bias optional)
 *   h_t    = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t,     h_{-1} = 0
 *   y_t    = C_t . h_t,  out_t = (y_t + D u_t) * silu(z_t)   (D, z optional)
 * and the loss gradient arrives as dout (batch, dim, L) and dlast (the last state's, batch, dim, N).
 *
 * Reverse mode, with dy = dout * silu(z) (or dout) and the adjoint g_t = dL/dh_t:
 *   g_t = dy_t C_t + exp(delta'_{t+1} A) g_{t+1},   g_{L-1} also gets dlast
 *   dC_t += dy_t h_t,  dB_t += g_t delta'_t u_t         (summed over the channels of the group)
 *   d(delta' u)_t = sum_n g_t B_t
 *   X_t = g_t h_{t-1} exp(delta'_t A):  d delta'_t += sum_n X_t A,  dA += sum_t X_t delta'_t
 *   dz = dout (y + D u) silu'(z),  dD = sum_t dy u,  du = dy D + d(delta' u) delta'
 *   d delta = (d delta' + d(delta' u) u) * sigmoid(delta + bias)  (the factor only with softplus)
 *
 * Work items: one batch element, one group, and one slice of that group's channel blocks (the Python
 * side cuts groups into slices when there are few (batch, group) pairs, by the shapes alone; items are
 * split over the threads by vz_parallel, so no result depends on the thread count). An
 * item writes its own slice of the dB, dC partial sums (batch, G, N, L per slice; summed over slices in
 * Python), so no two threads write the same memory. The sequence is cut into chunks of VZ_BT steps: a
 * forward pass per channel block stores the state at the start of every chunk; then the chunks are
 * visited last to first, and within a chunk every channel block of the item in turn, one group of VZ_W states
 * at a time, recomputes those states (kept for the chunk only, with their exp factors, small enough for L1)
 * from its checkpoint, adding up y and dC on the way, then walks the chunk backwards. dB and dC of the chunk are accumulated lane-wise over the blocks and
 * summed across lanes once per chunk. Per-channel sequences are read and written a chunk at a time
 * (vz_load_chunk: one vector per step for time-major memory, 8 x 8 transposed tiles for
 * (batch, dim, L)-contiguous memory). Memory per item: N vectors per (block, chunk) for the checkpoints,
 * plus O(VZ_BT N) vectors, never (L, N) per channel. dA, dD and d bias are per (batch element, channel)
 * partial sums, summed over the batch in Python.
 */
#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VZ_CB 16 /* one AVX-512 register (as the forward); must equal vz_scan_bwd_lanes() */
#else
#define VZ_CB 8 /* one AVX2 register */
#endif
#define VZ_NMAX 256
#define VZ_RMAX 256 /* largest dt_proj rank folded in (as the forward's) */
#define VZ_BT 32 /* steps per chunk */
#include "../_simd.h"
#include "_lowrank.h"

#define VZ_LOG2E 1.44269504088896340736f

/* 1 / (1 + e^-x) */
static inline vf vz_sigmoid(vf x) { return 1.0f / (1.0f + vz_exp2(x * -VZ_LOG2E)); }

typedef float v8 __attribute__((vector_size(32)));  /* 8 lanes, whatever VZ_CB */
typedef int32_t v8i __attribute__((vector_size(32)));

/* Two-input lane shuffle (GCC >= 12 and Clang have __builtin_shufflevector; older GCC __builtin_shuffle). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define VZ_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define VZ_SHUF(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (v8i){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* 8 x 8 transpose in place: r[i][j] <-> r[j][i]. Three rounds of two-input shuffles, each one AVX
 * instruction (unpack, shufps, vperm2f128): pairs of rows interleaved, then pairs of pairs, then halves. */
static inline void vz_transpose8(v8 *r) {
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = VZ_SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = VZ_SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int k = 0; k < 2; ++k) {
            u[i + 2 * k] = VZ_SHUF(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * k + 1] = VZ_SHUF(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 4; ++i) {
        r[i] = VZ_SHUF(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = VZ_SHUF(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* Steps t .. t + 7 of the lanes ch[8h .. 8h + 8) (h = 0 .. VZ_CB / 8 - 1) of a step-contiguous block: row c of
 * each 8 x 8 tile is 8 steps of one channel, transposed into 8 steps of 8 channels, which fill lanes 8h .. 8h + 7
 * of v[t + i]; and back. */
static inline void vz_tiles_load(vf *v, const float *base, int64_t sd, const int64_t *ch) {
    for (int h = 0; h < VZ_CB / 8; ++h) {
        v8 r[8];
        for (int c = 0; c < 8; ++c) memcpy(&r[c], base + ch[8 * h + c] * sd, sizeof(v8));
        vz_transpose8(r);
        for (int i = 0; i < 8; ++i) memcpy((float *)&v[i] + 8 * h, &r[i], sizeof(v8));
    }
}

static inline void vz_tiles_store(const vf *v, float *base, int64_t sd, const int64_t *ch) {
    for (int h = 0; h < VZ_CB / 8; ++h) {
        v8 r[8];
        for (int i = 0; i < 8; ++i) memcpy(&r[i], (const float *)&v[i] + 8 * h, sizeof(v8));
        vz_transpose8(r);
        for (int c = 0; c < 8; ++c) memcpy(base + ch[8 * h + c] * sd, &r[c], sizeof(v8));
    }
}

/* One chunk of a (batch, dim, L) sequence for a block of channels: v[t] = the lanes ch[0..nc) at steps
 * t < tl, base pointing at the chunk's first step (channel 0); lanes past nc are 0. Channel-contiguous
 * memory (time-major views) is one vector per step; step-contiguous memory ((batch, dim, L) contiguous)
 * goes in 8 x 8 tiles (vz_tiles_load); anything else lane by lane. */
static inline void vz_load_chunk(vf *v, int tl, const float *base, int64_t sd, int64_t sl, const int64_t *ch,
                                 int nc) {
    int t = 0;
    if (nc == VZ_CB && sd == 1) {
        for (; t < tl; ++t) memcpy(&v[t], base + ch[0] + t * sl, sizeof(vf));
        return;
    }
    if (nc == VZ_CB && sl == 1)
        for (; t + 8 <= tl; t += 8) vz_tiles_load(v + t, base + t, sd, ch);
    for (; t < tl; ++t) {
        vf x = {0};
        for (int c = 0; c < nc; ++c) x[c] = base[ch[c] * sd + t * sl];
        v[t] = x;
    }
}

/* The inverse: lanes ch[0..nc) of v[t] stored at base + ch[c] * sd + t * sl. */
static inline void vz_store_chunk(const vf *v, int tl, float *base, int64_t sd, int64_t sl, const int64_t *ch, int nc) {
    int t = 0;
    if (nc == VZ_CB && sd == 1) {
        for (; t < tl; ++t) memcpy(base + ch[0] + t * sl, &v[t], sizeof(vf));
        return;
    }
    if (nc == VZ_CB && sl == 1)
        for (; t + 8 <= tl; t += 8) vz_tiles_store(v + t, base + t, sd, ch);
    for (; t < tl; ++t)
        for (int c = 0; c < nc; ++c) base[ch[c] * sd + t * sl] = v[t][c];
}

/* Whether every |delta'_t A_n log2(e)| of a step is within 126 (false for NaN); a2max: max over n of
 * (A_n log2(e))^2, per lane. */
static inline int vz_in_range(vf dv, vf a2max) { return vz_all(dv * dv * a2max <= 126.0f * 126.0f); }

static inline float vz_hsum(vf v) {
    float s = 0.0f;
    for (int c = 0; c < VZ_CB; ++c) s += v[c];
    return s;
}

/* The three scans over one chunk of one channel block, each for w = VZ_W states n .. n + w - 1 (or w = 1
 * for the last N % VZ_W) at once, step after step: the w states (and adjoints, and dA sums) stay in
 * registers along the chunk, and the w independent chains keep the core busy. In all three, Bn and Cn
 * point at B, C of the chunk's first step and state n; in_range[t] says step t's exp2 arguments were
 * checked within 126 (vz_exp2_small). */
#define VZ_W 4

/* e[i] = exp(delta'_t A_{n+i}) (as exp2 of a2 = A log2 e) for w states; the unclamped exp2 when the step
 * was checked in range. */
VZ_INLINE void vz_decay(int w, vf dt, const vf *c, int in_range, vf *e) {
    for (int i = 0; i < w; ++i) e[i] = dt * c[i];
    if (in_range)
        for (int i = 0; i < w; ++i) e[i] = vz_exp2_small(e[i]);
    else
        vz_exp2_n(e, w);
}

/* h (N states) advanced over the chunk's steps, nothing stored (the checkpoint pass). */
VZ_INLINE void vz_advance(int w, int tl, int64_t n, vf *h, const vf *a2, const vf *dtv, const vf *duv,
                          const int *in_range, const float *Bn, int64_t B_sl, int64_t B_sn) {
    vf hn[VZ_W], c[VZ_W];
    for (int i = 0; i < w; ++i) hn[i] = h[n + i], c[i] = a2[n + i];
    for (int t = 0; t < tl; ++t) {
        vf e[VZ_W];
        vz_decay(w, dtv[t], c, in_range[t], e);
        for (int i = 0; i < w; ++i) hn[i] = e[i] * hn[i] + duv[t] * Bn[t * B_sl + i * B_sn];
    }
    for (int i = 0; i < w; ++i) h[n + i] = hn[i];
}

/* The chunk's states of states n .. n + w - 1 from the checkpoint h0 (N states): hs[t][i] (after step t) and
 * eA[t][i] = exp(delta'_t A_{n+i}) stored for these w states only (2 VZ_BT w vectors: they stay in L1 for the walk
 * that follows), C_t . h_t added into yv[t], dC_t += dy_t h_t (lane-wise, into dCacc, [t][N]). */
VZ_INLINE void vz_recompute(int w, int tl, int64_t n, int64_t N, const vf *h0, const vf *a2, const vf *dtv,
                            const vf *duv, const int *in_range, const float *Bn, int64_t B_sl, int64_t B_sn,
                            const float *Cn, int64_t C_sl, int64_t C_sn, const vf *dyv, vf *hs, vf *eA, vf *yv,
                            vf *dCacc) {
    vf hn[VZ_W], c[VZ_W];
    for (int i = 0; i < w; ++i) hn[i] = h0[n + i], c[i] = a2[n + i];
    for (int t = 0; t < tl; ++t) {
        vf e[VZ_W];
        vz_decay(w, dtv[t], c, in_range[t], e);
        vf y = yv[t];
        for (int i = 0; i < w; ++i) {
            hn[i] = e[i] * hn[i] + duv[t] * Bn[t * B_sl + i * B_sn];
            eA[t * w + i] = e[i];
            hs[t * w + i] = hn[i];
            y += Cn[t * C_sl + i * C_sn] * hn[i];
            dCacc[t * N + n + i] += dyv[t] * hn[i];
        }
        yv[t] = y;
    }
}

/* The reverse walk of states n .. n + w - 1 over vz_recompute's hs, eA: g_t = dy_t C_t + exp(delta'_{t+1} A) g_{t+1}
 * from the adjoint cg carried in, with dB_t += g_t delta'_t u_t (lane-wise, into dBacc, [t][N]), the dA sums, and
 * sum_n g_t B_t (into ddu[t]) and sum_n X_t A (into ddt[t]), X_t = g_t h_{t-1} exp(delta'_t A). */
VZ_INLINE void vz_walk(int w, int tl, int64_t n, int64_t N, const vf *h0, const vf *a, const vf *hs,
                       const vf *eA, const vf *dtv, const vf *duv, const vf *dyv, const float *Bn, int64_t B_sl,
                       int64_t B_sn, const float *Cn, int64_t C_sl, int64_t C_sn, vf *cg, vf *dAs, vf *dBacc,
                       vf *ddu, vf *ddt) {
    vf g[VZ_W], da[VZ_W], an[VZ_W];
    for (int i = 0; i < w; ++i) g[i] = cg[n + i], da[i] = dAs[n + i], an[i] = a[n + i];
    for (int t = tl - 1; t >= 0; --t) {
        const vf *hp = t ? hs + (t - 1) * w : h0 + n;
        const vf dy = dyv[t], dub = duv[t], dv = dtv[t];
        vf su = {0}, st = {0};
        for (int i = 0; i < w; ++i) {
            const vf gi = dy * Cn[t * C_sl + i * C_sn] + g[i], e = eA[t * w + i];
            dBacc[t * N + n + i] += gi * dub;
            su += gi * Bn[t * B_sl + i * B_sn];
            g[i] = gi * e;
            const vf x = g[i] * hp[i];
            st += x * an[i];
            da[i] += x * dv;
        }
        ddu[t] += su;
        ddt[t] += st;
    }
    for (int i = 0; i < w; ++i) cg[n + i] = g[i], dAs[n + i] = da[i];
}

/* The channels of one block and the per-channel constants. */
typedef struct {
    int64_t ch[VZ_CB];
    int nc;
} vz_block;

static void vz_block_at(vz_block *k, int64_t d0, int64_t end) {
    k->nc = end - d0 < VZ_CB ? (int)(end - d0) : VZ_CB;
    for (int c = 0; c < VZ_CB; ++c) k->ch[c] = d0 + (c < k->nc ? c : 0); /* spare lanes repeat d0 */
}

static inline vf vz_gather(const float *p, const vz_block *k) {
    vf v;
    for (int c = 0; c < VZ_CB; ++c) v[c] = p[k->ch[c]];
    return v;
}

/* One chunk of delta + bias for a block of channels: loaded (rank 0), or with rank > 0 from the low-rank factor
 * (base: its first step, sd its rank stride; wdt: the block's dt_w columns), as the forward computed it. */
static inline void vz_delta_chunk(vf *v, int tl, const float *base, int64_t sd, int64_t sl, const vz_block *k,
                                  vf bs, const vf *wdt, int64_t rank) {
    if (rank) {
        for (int t = 0; t < tl; ++t) v[t] = vz_lowrank_delta(bs, base + t * sl, sd, wdt, rank);
        return;
    }
    vz_load_chunk(v, tl, base, sd, sl, k->ch, k->nc);
    for (int t = 0; t < tl; ++t) v[t] += bs;
}

/* The block's dt_w columns, one vector per rank index (lanes past the block repeat its first channel's). */
static inline void vz_dt_columns(vf *wdt, const float *dt_w, int64_t rank, const vz_block *k) {
    for (int64_t r = 0; r < rank; ++r)
        for (int c = 0; c < VZ_CB; ++c) wdt[r][c] = dt_w[k->ch[c] * rank + r];
}

/* Strides are in elements. u, delta, z, dout: (batch, dim, L), strides (s_b, s_d, s_l) each; with rank > 0,
 * delta is instead the low-rank factor dt (batch, rank, L) of delta[b, c, t] = sum_r dt_w[c, r] dt[b, r, t]
 * (d_sd its rank stride; dt_w (dim, rank) contiguous: Mamba's dt_proj folded in, as the forward kernel takes
 * it), and ddelta is still the gradient of that (batch, dim, L) delta; A: (dim, N)
 * contiguous; B, C: (batch, G, N, L), any strides; D, bias: (dim,) or NULL; z, dout, dlast may be NULL
 * (dout NULL: zero gradient of out; dlast: (batch, dim, N) contiguous). ckpt: NULL, or the forward's state
 * checkpoints (_cpu_kernel.c, same VZ_BT), ckpt[((b * chunks + q) * N + n) * ck_row + c] the state before
 * step q * VZ_BT: then the checkpoint pass is skipped.
 * Outputs: du, ddelta, dz (dz only with z): (batch, dim, L), strides *_s*; dB, dC: (splits, batch, G, N, L)
 * partial sums with strides (s_s, s_b, s_g, s_n, s_l), every element written; dA: (batch, dim, N)
 * contiguous, dD, dbias: (batch, dim) contiguous (NULL when D, bias are NULL), per batch element, every
 * element written. The Python mirror is _cpu_bwd.py's BwdArgs. */
typedef struct {
    int64_t batch, dim, length, dstate, groups, splits;
    const float *u;
    int64_t u_sb, u_sd, u_sl;
    const float *delta;
    int64_t d_sb, d_sd, d_sl;
    const float *dt_w;
    int64_t rank;
    const float *A;
    const float *B;
    int64_t B_sb, B_sg, B_sn, B_sl;
    const float *C;
    int64_t C_sb, C_sg, C_sn, C_sl;
    const float *D, *bias;
    const float *z;
    int64_t z_sb, z_sd, z_sl;
    int64_t softplus;
    const float *dout;
    int64_t g_sb, g_sd, g_sl;
    const float *dlast;
    const float *ckpt;
    int64_t ck_row;
    float *du;
    int64_t du_sb, du_sd, du_sl;
    float *ddelta;
    int64_t dd_sb, dd_sd, dd_sl;
    float *dz;
    int64_t dz_sb, dz_sd, dz_sl;
    float *dB;
    int64_t dB_ss, dB_sb, dB_sg, dB_sn, dB_sl;
    float *dC;
    int64_t dC_ss, dC_sb, dC_sg, dC_sn, dC_sl;
    float *dA, *dD, *dbias;
} vz_scan_bwd_args;

/* Items [item_begin, item_end) of batch * groups * splits. Returns 0, or -2 when out of memory. */
static int bwd_range(const void *p, int64_t item_begin, int64_t item_end)
{
    const vz_scan_bwd_args *args = p;
    const int64_t dim = args->dim, length = args->length, dstate = args->dstate, groups = args->groups,
                  splits = args->splits;
    const float *u = args->u, *delta = args->delta, *A = args->A, *B = args->B, *C = args->C, *D = args->D,
                *bias = args->bias, *z = args->z, *dout = args->dout, *dlast = args->dlast, *ckin = args->ckpt,
                *dt_w = args->dt_w;
    const int64_t rank = args->rank;
    const int64_t u_sb = args->u_sb, u_sd = args->u_sd, u_sl = args->u_sl;
    const int64_t d_sb = args->d_sb, d_sd = args->d_sd, d_sl = args->d_sl;
    const int64_t B_sb = args->B_sb, B_sg = args->B_sg, B_sn = args->B_sn, B_sl = args->B_sl;
    const int64_t C_sb = args->C_sb, C_sg = args->C_sg, C_sn = args->C_sn, C_sl = args->C_sl;
    const int64_t z_sb = args->z_sb, z_sd = args->z_sd, z_sl = args->z_sl;
    const int64_t g_sb = args->g_sb, g_sd = args->g_sd, g_sl = args->g_sl, ck_row = args->ck_row;
    const int softplus = args->softplus != 0;
    float *du = args->du, *ddelta = args->ddelta, *dz = args->dz, *dB = args->dB, *dC = args->dC;
    float *dA = args->dA, *dD = args->dD, *dbias = args->dbias;
    const int64_t du_sb = args->du_sb, du_sd = args->du_sd, du_sl = args->du_sl;
    const int64_t dd_sb = args->dd_sb, dd_sd = args->dd_sd, dd_sl = args->dd_sl;
    const int64_t dz_sb = args->dz_sb, dz_sd = args->dz_sd, dz_sl = args->dz_sl;
    const int64_t dB_ss = args->dB_ss, dB_sb = args->dB_sb, dB_sg = args->dB_sg, dB_sn = args->dB_sn,
                  dB_sl = args->dB_sl;
    const int64_t dC_ss = args->dC_ss, dC_sb = args->dC_sb, dC_sg = args->dC_sg, dC_sn = args->dC_sn,
                  dC_sl = args->dC_sl;
    if (item_begin >= item_end) return 0;
    const int64_t N = dstate, dg = dim / groups;
    const int64_t gblocks = (dg + VZ_CB - 1) / VZ_CB;        /* channel blocks per group */
    const int64_t most = (gblocks + splits - 1) / splits + 1; /* most blocks in one slice */
    const int64_t chunks = (length + VZ_BT - 1) / VZ_BT;

    /* Scratch: per block of the slice, the chunk checkpoints (chunks x N; one N for the checkpoint being
     * used when the forward's are given), the adjoint carried into the chunk being walked (N), the dA sums
     * (N), the dD and d bias sums (1 each); per chunk, the lane-wise dB, dC sums (VZ_BT x N each), and the states
     * and exp factors of its steps for one group of VZ_W states (VZ_BT x VZ_W each). */
    const int64_t slots = ckin ? 1 : most * chunks;
    const size_t nv =
        (size_t)(slots * N) + (size_t)most * (size_t)(2 * N + 2) + (size_t)(2 * VZ_BT) * (size_t)(N + VZ_W);
    vf *scratch = NULL;
    if (posix_memalign((void **)&scratch, 64, nv * sizeof(vf))) return -2;
    vf *ckpt = scratch;                         /* [most][chunks][N], or [N] */
    vf *carry = ckpt + slots * N;               /* [most][N] */
    vf *dAacc = carry + most * N;               /* [most][N] */
    vf *dDacc = dAacc + most * N;               /* [most]: dD sums */
    vf *dbacc = dDacc + most;                   /* [most]: d bias sums */
    vf *hs = dbacc + most;                      /* [VZ_BT][VZ_W]: state after step t, of one group of states */
    vf *eA = hs + VZ_BT * VZ_W;                 /* [VZ_BT][VZ_W]: exp(delta'_t A) */
    vf *dBacc = eA + VZ_BT * VZ_W;              /* [VZ_BT][N] */
    vf *dCacc = dBacc + VZ_BT * N;              /* [VZ_BT][N] */
    vf a[VZ_NMAX], a2[VZ_NMAX], wdt[VZ_RMAX];
    const vz_fpmode fpmode = vz_ftz_on();

    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / (groups * splits), g = (item / splits) % groups, s = item % splits;
        const int64_t j0 = s * gblocks / splits, nb = (s + 1) * gblocks / splits - j0;
        const int64_t gend = (g + 1) * dg; /* first channel past the group */
        const float *ub = u + b * u_sb, *db = delta + b * d_sb, *zb = z ? z + b * z_sb : 0;
        const float *gb = dout ? dout + b * g_sb : 0;
        const float *Bb = B + b * B_sb + g * B_sg, *Cb = C + b * C_sb + g * C_sg;
        float *dBb = dB + s * dB_ss + b * dB_sb + g * dB_sg, *dCb = dC + s * dC_ss + b * dC_sb + g * dC_sg;
        /* Forward: checkpoints, adjoint and sum initialisation. */
        for (int64_t j = 0; j < nb; ++j) {
            vz_block k;
            vz_block_at(&k, g * dg + (j0 + j) * VZ_CB, gend);
            const vf bs = bias ? vz_gather(bias, &k) : (vf){0};
            vz_dt_columns(wdt, dt_w, rank, &k);
            vf h[VZ_NMAX], a2max = {0};
            for (int64_t n = 0; n < N; ++n) {
                for (int c = 0; c < VZ_CB; ++c) a2[n][c] = A[k.ch[c] * N + n] * VZ_LOG2E;
                a2max = VSEL(a2[n] * a2[n] > a2max, a2[n] * a2[n], a2max);
                h[n] = (vf){0};
                dAacc[j * N + n] = (vf){0};
                vf gl = {0};
                for (int c = 0; c < k.nc && dlast; ++c) gl[c] = dlast[(b * dim + k.ch[c]) * N + n];
                carry[j * N + n] = gl;
            }
            dDacc[j] = (vf){0};
            dbacc[j] = (vf){0};
            for (int64_t q = 0; q < chunks && !ckin; ++q) {
                memcpy(ckpt + (j * chunks + q) * N, h, N * sizeof(vf));
                if (q == chunks - 1) break; /* the state after the last step is not needed */
                const int64_t l0 = q * VZ_BT;
                const int tl = length - l0 < VZ_BT ? (int)(length - l0) : VZ_BT;
                vf dtv[VZ_BT], duv[VZ_BT];
                vz_delta_chunk(dtv, tl, db + l0 * d_sl, d_sd, d_sl, &k, bs, wdt, rank);
                vz_load_chunk(duv, tl, ub + l0 * u_sl, u_sd, u_sl, k.ch, k.nc);
                if (softplus)
                    for (int t = 0; t < tl; ++t) dtv[t] = vz_softplus(dtv[t]);
                int in_range[VZ_BT];
                for (int t = 0; t < tl; ++t) {
                    duv[t] *= dtv[t];
                    in_range[t] = vz_in_range(dtv[t], a2max);
                }
                const float *Bq = Bb + l0 * B_sl;
                int64_t n = 0;
                for (; n + VZ_W <= N; n += VZ_W)
                    vz_advance(VZ_W, tl, n, h, a2, dtv, duv, in_range, Bq + n * B_sn, B_sl, B_sn);
                for (; n < N; ++n) vz_advance(1, tl, n, h, a2, dtv, duv, in_range, Bq + n * B_sn, B_sl, B_sn);
            }
        }
        /* Backward, chunk by chunk from the last. */
        for (int64_t q = chunks - 1; q >= 0; --q) {
            const int64_t l0 = q * VZ_BT;
            const int tl = length - l0 < VZ_BT ? (int)(length - l0) : VZ_BT;
            memset(dBacc, 0, (size_t)tl * N * sizeof(vf));
            memset(dCacc, 0, (size_t)tl * N * sizeof(vf));
            for (int64_t j = 0; j < nb; ++j) {
                vz_block k;
                vz_block_at(&k, g * dg + (j0 + j) * VZ_CB, gend);
                const vf bs = bias ? vz_gather(bias, &k) : (vf){0};
                const vf dd = D ? vz_gather(D, &k) : (vf){0};
                vz_dt_columns(wdt, dt_w, rank, &k);
                vf a2max = {0};
                for (int64_t n = 0; n < N; ++n) {
                    for (int c = 0; c < VZ_CB; ++c) a[n][c] = A[k.ch[c] * N + n];
                    a2[n] = a[n] * VZ_LOG2E;
                    a2max = VSEL(a2[n] * a2[n] > a2max, a2[n] * a2[n], a2max);
                }
                /* Per step: u, delta + bias (pre), delta', delta' u, dout, z, y, and the gradients. */
                vf uv[VZ_BT], pre[VZ_BT], dtv[VZ_BT], duv[VZ_BT], dyv[VZ_BT], yv[VZ_BT], gu[VZ_BT];
                vz_load_chunk(uv, tl, ub + l0 * u_sl, u_sd, u_sl, k.ch, k.nc); /* 0 in spare lanes */
                vz_delta_chunk(pre, tl, db + l0 * d_sl, d_sd, d_sl, &k, bs, wdt, rank);
                if (gb)
                    vz_load_chunk(dyv, tl, gb + l0 * g_sl, g_sd, g_sl, k.ch, k.nc);
                else
                    for (int t = 0; t < tl; ++t) dyv[t] = (vf){0};
                for (int t = 0; t < tl; ++t) dtv[t] = softplus ? vz_softplus(pre[t]) : pre[t];
                for (int t = 0; t < tl; ++t) duv[t] = dtv[t] * uv[t];
                /* dy = dout silu(z) (the gradient of y + D u); z and dout kept for dz. */
                vf zt[VZ_BT], sgt[VZ_BT], got[VZ_BT];
                if (z) {
                    vz_load_chunk(zt, tl, zb + l0 * z_sl, z_sd, z_sl, k.ch, k.nc);
                    for (int t = 0; t < tl; ++t) {
                        sgt[t] = vz_sigmoid(zt[t]);
                        got[t] = dyv[t];
                        dyv[t] *= zt[t] * sgt[t];
                    }
                }
                /* Recompute the chunk's states from the checkpoint, y and dC. */
                const vf *h0 = ckpt + (j * chunks + q) * N;
                if (ckin) { /* the forward's checkpoint (spare lanes 0) */
                    const float *src = ckin + (b * chunks + q) * N * ck_row;
                    for (int64_t n = 0; n < N; ++n) {
                        vf hv = {0};
                        if (k.nc == VZ_CB)
                            memcpy(&hv, src + n * ck_row + k.ch[0], sizeof hv);
                        else
                            for (int c = 0; c < k.nc; ++c) hv[c] = src[n * ck_row + k.ch[c]];
                        ckpt[n] = hv;
                    }
                    h0 = ckpt;
                }
                const float *Bq = Bb + l0 * B_sl, *Cq = Cb + l0 * C_sl;
                int in_range[VZ_BT];
                for (int t = 0; t < tl; ++t) {
                    in_range[t] = vz_in_range(dtv[t], a2max);
                    yv[t] = (vf){0};
                }
                /* Per group of states: recompute its chunk of states (y and dC on the way), then walk it backwards
                 * while it is in L1 (the groups' sums over n add up in the same order as all-recompute-then-walk). */
                vf *cg = carry + j * N, *dAs = dAacc + j * N;
                vf ddu[VZ_BT], ddt[VZ_BT];
                for (int t = 0; t < tl; ++t) ddu[t] = ddt[t] = (vf){0};
                for (int64_t n = 0; n < N;) {
                    const int w = n + VZ_W <= N ? VZ_W : 1;
                    const float *Bn = Bq + n * B_sn, *Cn = Cq + n * C_sn;
                    if (w == VZ_W) {
                        vz_recompute(VZ_W, tl, n, N, h0, a2, dtv, duv, in_range, Bn, B_sl, B_sn, Cn, C_sl, C_sn, dyv,
                                     hs, eA, yv, dCacc);
                        vz_walk(VZ_W, tl, n, N, h0, a, hs, eA, dtv, duv, dyv, Bn, B_sl, B_sn, Cn, C_sl, C_sn, cg, dAs,
                                dBacc, ddu, ddt);
                    } else {
                        vz_recompute(1, tl, n, N, h0, a2, dtv, duv, in_range, Bn, B_sl, B_sn, Cn, C_sl, C_sn, dyv, hs,
                                     eA, yv, dCacc);
                        vz_walk(1, tl, n, N, h0, a, hs, eA, dtv, duv, dyv, Bn, B_sl, B_sn, Cn, C_sl, C_sn, cg, dAs,
                                dBacc, ddu, ddt);
                    }
                    n += w;
                }
                /* Output stage: dz (needs the whole y), dD and the D part of du. */
                if (z) {
                    for (int t = 0; t < tl; ++t) {
                        const vf zv = zt[t], sg = sgt[t], ypre = yv[t] + dd * uv[t];
                        zt[t] = got[t] * ypre * sg * (1.0f + zv * (1.0f - sg)); /* dz */
                    }
                    vz_store_chunk(zt, tl, dz + b * dz_sb + l0 * dz_sl, dz_sd, dz_sl, k.ch, k.nc);
                }
                vf dDs = dDacc[j];
                for (int t = 0; t < tl; ++t) {
                    dDs += dyv[t] * uv[t];
                    gu[t] = dyv[t] * dd;
                }
                dDacc[j] = dDs;
                /* d delta' and the delta' u part of du, then d delta through the softplus. */
                vf dbs = dbacc[j];
                for (int t = 0; t < tl; ++t) {
                    vf dt = ddt[t] + ddu[t] * uv[t];
                    gu[t] += ddu[t] * dtv[t];
                    if (softplus) dt *= vz_sigmoid(pre[t]);
                    dbs += dt;
                    ddt[t] = dt;
                }
                dbacc[j] = dbs;
                vz_store_chunk(ddt, tl, ddelta + b * dd_sb + l0 * dd_sl, dd_sd, dd_sl, k.ch, k.nc);
                vz_store_chunk(gu, tl, du + b * du_sb + l0 * du_sl, du_sd, du_sl, k.ch, k.nc);
            }
            for (int t = 0; t < tl; ++t)
                for (int64_t n = 0; n < N; ++n) {
                    dBb[n * dB_sn + (l0 + t) * dB_sl] = vz_hsum(dBacc[t * N + n]);
                    dCb[n * dC_sn + (l0 + t) * dC_sl] = vz_hsum(dCacc[t * N + n]);
                }
        }
        /* The per-channel sums. */
        for (int64_t j = 0; j < nb; ++j) {
            vz_block k;
            vz_block_at(&k, g * dg + (j0 + j) * VZ_CB, gend);
            for (int c = 0; c < k.nc; ++c) {
                const int64_t o = b * dim + k.ch[c];
                for (int64_t n = 0; n < N; ++n) dA[o * N + n] = dAacc[j * N + n][c];
                if (dD) dD[o] = dDacc[j][c];
                if (dbias) dbias[o] = dbacc[j][c];
            }
        }
    }
    vz_ftz_restore(fpmode);
    free(scratch);
    return 0;
}

/* The channels per block (vector lanes) this build uses: the Python side cuts work items by blocks. */
int vz_scan_bwd_lanes(void) { return VZ_CB; }

/* The gradients over nthreads threads (each item, and so each output element, on one thread). Returns 0,
 * -1 when N > VZ_NMAX, rank > VZ_RMAX or dim is not a multiple of groups, -2 when out of memory. */
int vz_selective_scan_bwd(const vz_scan_bwd_args *args, int64_t nthreads)
{
    if (args->dstate > VZ_NMAX || args->dstate < 1 || args->groups < 1 || args->splits < 1 || args->rank < 0 ||
        args->rank > VZ_RMAX || (args->rank && !args->dt_w) ||
        args->dim % args->groups || (args->ckpt && args->ck_row < args->dim))
        return -1;
    return vz_parallel(args->batch * args->groups * args->splits, nthreads, bwd_range, args);
}
