/* Selective-scan forward for the CPU, compiled on first use by visionzoo/ops/selective_scan/_cpu.py.
 *
 * Plain C (no Python or torch headers), called through ctypes. One work item is one batch element and
 * a block of VZ_CB consecutive channels (of every job: see vz_selective_scan_fwd); the state h (N x VZ_CB
 * floats) stays in a local array while the item walks along the sequence, so nothing of size (L, N) is ever
 * written to memory. All arithmetic is on vectors of the VZ_CB channels (GCC/Clang vector extensions): 16,
 * one AVX-512 register, where the build targets AVX-512 (the fused Vim-Ti mixer at 224: 1.01 -> 0.84 ms on a
 * Xeon), else 8, one AVX2 register (vectors wider than the hardware's make GCC scalarise the comparisons;
 * the Python side does not depend on the width), with exp2, softplus and SiLU written
 * (in _simd.h) as range reduction plus polynomials (a few ulp in fp32) so that no libm call breaks the
 * SIMD code and no -ffast-math is needed.
 *
 * Semantics are those of the reference backend (mamba-ssm's selective_scan_ref):
 *   delta' = softplus(delta + bias)            (softplus optional; bias optional)
 *   h_t    = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t
 *   y_t    = C_t . h_t (+ D u_t)  (* silu(z_t))
 * B and C are shared by the VZ_CB channels of a block (they belong to one group).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VZ_CB 16 /* one AVX-512 register */
#else
#define VZ_CB 8 /* one AVX2 register */
#endif
#define VZ_NMAX 256
#define VZ_RMAX 256
#define VZ_TT 64 /* steps per tile */
#define VZ_BT 32 /* steps per checkpoint chunk: must equal VZ_BT in _cpu_bwd_kernel.c, and divide VZ_TT */
#include "../_simd.h"
#include "_lowrank.h"

/* One scan (one direction of a Vim mixer): strides are in elements. u, z: (batch, dim, L) with strides
 * (s_b, s_d, s_l) each; out: (batch, dim, L) with strides o_*; A2: (dim, N) = A * log2(e), contiguous, or
 * with a_log A_log (dim, N), A = -exp(A_log) (Mamba's parameterisation, turned into A log2(e) here);
 * B, C: (batch, G, N, L), any strides; D, bias: (dim,) or NULL; z may be NULL; last_state: (batch, dim, N)
 * contiguous, or NULL. delta: (batch, dim, L) with strides d_*, or, with rank > 0, the low-rank factor dt
 * (batch, rank, L) (d_sd is then its rank stride) of delta[b, c, t] = sum_r dt_w[c, r] dt[b, r, t], dt_w
 * (dim, rank) contiguous: Mamba's dt_proj folded into the scan, so the (L, dim) delta is never written to
 * memory. ckpt, when not NULL: the state before every VZ_BT-th step (t = 0, VZ_BT, ...) stored as
 * ckpt[((b * chunks + q) * N + n) * ck_row + c] for the backward (_cpu_bwd_kernel.c reads them instead of
 * recomputing them); ck_row >= dim.
 * out = out_scale * result, or out += out_scale * result with accumulate (the bidirectional scan adds
 * its second direction into the first's output); with gate_total, result is taken without the gate and
 * the gate multiplies the final out instead: out = (out + out_scale * y) * silu(z). out may be u itself (each step reads u before it
 * writes out). Time strides may be negative: a pointer to the last step with a negative stride reads or
 * writes a sequence time-reversed without a flipped copy. The Python mirror is _cpu.py's ScanArgs. */
typedef struct {
    int64_t batch, dim, length, dstate, groups;
    const float *u;
    int64_t u_sb, u_sd, u_sl;
    const float *delta;
    int64_t d_sb, d_sd, d_sl;
    const float *dt_w;
    int64_t rank;
    const float *A2;
    int64_t a_log;
    const float *B;
    int64_t B_sb, B_sg, B_sn, B_sl;
    const float *C;
    int64_t C_sb, C_sg, C_sn, C_sl;
    const float *D, *bias;
    const float *z;
    int64_t z_sb, z_sd, z_sl;
    int64_t softplus;
    float *out;
    int64_t o_sb, o_sd, o_sl;
    float *last_state;
    float *ckpt;
    int64_t ck_row;
    float out_scale;
    int32_t accumulate, gate_total;
} vz_scan_args;

/* Item `item` (batch element b, channel block item % blocks) of one scan. */
static void scan_item(const vz_scan_args *args, int64_t item)
{
    const int64_t batch = args->batch, dim = args->dim, length = args->length, dstate = args->dstate,
                  groups = args->groups;
    const float *u = args->u, *delta = args->delta, *dt_w = args->dt_w, *A2 = args->A2, *B = args->B,
                *C = args->C, *D = args->D, *bias = args->bias, *z = args->z;
    const int64_t u_sd = args->u_sd, u_sl = args->u_sl, d_sd = args->d_sd, d_sl = args->d_sl, rank = args->rank;
    const int64_t B_sb = args->B_sb, B_sg = args->B_sg, B_sn = args->B_sn, B_sl = args->B_sl;
    const int64_t C_sb = args->C_sb, C_sg = args->C_sg, C_sn = args->C_sn, C_sl = args->C_sl;
    const int64_t z_sd = args->z_sd, z_sl = args->z_sl, o_sd = args->o_sd, o_sl = args->o_sl;
    const int softplus = args->softplus != 0, accumulate = args->accumulate != 0, gate_total = args->gate_total != 0;
    const float out_scale = args->out_scale;
    float *out = args->out, *last_state = args->last_state, *ckpt = args->ckpt;
    (void)batch;
    const int64_t N = dstate, dg = dim / groups;
    const int64_t blocks = (dim + VZ_CB - 1) / VZ_CB;
    const int64_t chunks = (length + VZ_BT - 1) / VZ_BT;
    vf h[VZ_NMAX], a2[VZ_NMAX], wdt[VZ_RMAX];
    int64_t ch[VZ_CB], grp[VZ_CB];
    {
        const int64_t b = item / blocks, d0 = (item % blocks) * VZ_CB;
        const int64_t nc = dim - d0 < VZ_CB ? dim - d0 : VZ_CB;
        vf dd = {0}, bs = {0};
        /* Lanes past the last channel repeat channel d0 and are never stored. */
        for (int c = 0; c < VZ_CB; ++c) {
            ch[c] = d0 + (c < nc ? c : 0);
            grp[c] = ch[c] / dg;
            dd[c] = D ? D[ch[c]] : 0.0f;
            bs[c] = bias ? bias[ch[c]] : 0.0f;
        }
        vf a2max = {0};  /* max over n of a2[n]^2, per lane */
        for (int64_t n = 0; n < N; ++n) {
            for (int c = 0; c < VZ_CB; ++c) a2[n][c] = A2[ch[c] * N + n];
            if (args->a_log) a2[n] = -1.44269504088896340736f * vz_exp2(a2[n] * 1.44269504088896340736f);
            const vf sq = a2[n] * a2[n];
            a2max = VSEL(sq > a2max, sq, a2max);
            h[n] = (vf){0};
        }
        for (int64_t r = 0; r < rank; ++r)
            for (int c = 0; c < VZ_CB; ++c) wdt[r][c] = dt_w[ch[c] * rank + r];
        /* The fast path: the 8 channels of one group (B, C shared by all lanes) stored contiguously along
         * the channel axis (Vim's time-major views). Otherwise lanes are gathered one by one. */
        const int one_group = grp[0] == grp[nc - 1];
        const int dense = nc == VZ_CB && u_sd == 1 && (rank || d_sd == 1) && o_sd == 1 && (!z || z_sd == 1);
        const float *ub = u + b * args->u_sb, *db = delta + b * args->d_sb, *zb = z ? z + b * args->z_sb : 0;
        float *ob = out + b * args->o_sb;
        /* Steps go in tiles of VZ_TT, in three passes: (1) delta' = softplus(delta + bias), delta' u and
         * D u for every step of the tile; (2) the recurrence; (3) the gate and the store. Passes 1 and 3
         * have no dependence between steps, so the core overlaps their long dt/softplus/exp/divide chains
         * across steps; interleaved with the recurrence (one step's work exceeds the reorder window) those
         * chains were paid in full at every step, which was half of the kernel's time. */
        vf dvt[VZ_TT], dut[VZ_TT], yt[VZ_TT];
        int small[VZ_TT];
        for (int64_t l0 = 0; l0 < length; l0 += VZ_TT) {
            const int tl = length - l0 < VZ_TT ? (int)(length - l0) : VZ_TT;
            /* Pass 1 as short loops over the tile's steps (loop fission): every iteration is small and
             * independent of the others, so the core keeps many of them, and their dependency chains
             * (dt_proj sum, softplus), in flight at once. */
            for (int t = 0; t < tl; ++t) {
                const int64_t l = l0 + t;
                vf uv, dv = bs;
                if (dense)
                    memcpy(&uv, ub + d0 + l * u_sl, sizeof uv);
                else
                    for (int c = 0; c < VZ_CB; ++c) uv[c] = ub[ch[c] * u_sd + l * u_sl];
                if (rank) {
                    dv = vz_lowrank_delta(bs, db + l * d_sl, d_sd, wdt, rank);
                } else if (dense) {
                    vf dl;
                    memcpy(&dl, db + d0 + l * d_sl, sizeof dl);
                    dv += dl;
                } else {
                    for (int c = 0; c < VZ_CB; ++c) dv[c] += db[ch[c] * d_sd + l * d_sl];
                }
                dvt[t] = dv;
                dut[t] = uv;
                yt[t] = dd * uv;
            }
            if (softplus)
                for (int t = 0; t < tl; ++t) dvt[t] = vz_softplus(dvt[t]);
            for (int t = 0; t < tl; ++t) {
                const vf dv = dvt[t];
                dut[t] *= dv;
                /* Every |delta' A log2(e)| of the step within 126 (false for NaN): the unclamped exp2. */
                small[t] = vz_all(dv * dv * a2max <= 126.0f * 126.0f);
            }
            for (int t = 0; t < tl; ++t) {
                const int64_t l = l0 + t;
                const vf dv = dvt[t], du = dut[t];
                vf y = yt[t];
                if (ckpt && l % VZ_BT == 0) {
                    float *ck = ckpt + (b * chunks + l / VZ_BT) * N * args->ck_row + d0;
                    for (int64_t n = 0; n < N; ++n) {
                        if (nc == VZ_CB)
                            memcpy(ck + n * args->ck_row, &h[n], sizeof(vf));
                        else
                            for (int c = 0; c < nc; ++c) ck[n * args->ck_row + c] = h[n][c];
                    }
                }
                if (one_group) {
                    const float *Bl = B + b * B_sb + grp[0] * B_sg + l * B_sl;
                    const float *Cl = C + b * C_sb + grp[0] * C_sg + l * C_sl;
                    const int in_range = small[t];  /* the compiler unswitches the loop on it */
                    for (int64_t n = 0; n < N; ++n) {
                        const vf x = dv * a2[n];
                        const vf hn = (in_range ? vz_exp2_small(x) : vz_exp2(x)) * h[n] + du * Bl[n * B_sn];
                        h[n] = hn;
                        y += Cl[n * C_sn] * hn;
                    }
                } else {
                    for (int64_t n = 0; n < N; ++n) {
                        vf bn = {0}, cn = {0};
                        for (int c = 0; c < VZ_CB; ++c) {
                            bn[c] = B[b * B_sb + grp[c] * B_sg + n * B_sn + l * B_sl];
                            cn[c] = C[b * C_sb + grp[c] * C_sg + n * C_sn + l * C_sl];
                        }
                        const vf hn = vz_exp2(dv * a2[n]) * h[n] + du * bn;
                        h[n] = hn;
                        y += cn * hn;
                    }
                }
                yt[t] = y;
            }
            /* Pass 3 likewise: the gates' SiLU over the tile (into dvt, free now), then the stores. With
             * gate_total the gate multiplies the accumulated output instead of this job's part (the fused Vim
             * path: both directions share the gate, so it is applied once, by the second). */
            if (zb) {
                for (int t = 0; t < tl; ++t) {
                    const int64_t l = l0 + t;
                    if (dense)
                        memcpy(&dvt[t], zb + d0 + l * z_sl, sizeof dvt[t]);
                    else
                        for (int c = 0; c < VZ_CB; ++c) dvt[t][c] = zb[ch[c] * z_sd + l * z_sl];
                }
                for (int t = 0; t < tl; ++t) dvt[t] = vz_silu(dvt[t]);
                if (!gate_total)
                    for (int t = 0; t < tl; ++t) yt[t] *= dvt[t];
            }
            const int gate_out = zb && gate_total;
            for (int t = 0; t < tl; ++t) {
                const int64_t l = l0 + t;
                vf y = yt[t] * out_scale;
                if (dense) {
                    if (accumulate) {
                        vf prev;
                        memcpy(&prev, ob + d0 + l * o_sl, sizeof prev);
                        y += prev;
                    }
                    if (gate_out) y *= dvt[t];
                    memcpy(ob + d0 + l * o_sl, &y, sizeof y);
                } else {
                    for (int c = 0; c < nc; ++c) {
                        float *o = ob + ch[c] * o_sd + l * o_sl;
                        const float v = accumulate ? *o + y[c] : y[c];
                        *o = gate_out ? v * dvt[t][c] : v;
                    }
                }
            }
        }
        for (int c = 0; c < nc && last_state; ++c)
            for (int64_t n = 0; n < N; ++n)
                last_state[(b * dim + ch[c]) * N + n] = h[n][c];
    }
}

typedef struct {
    const vz_scan_args *jobs;
    int64_t njobs, per_job, independent;
} scan_ctx;

static int scan_range(const void *p, int64_t begin, int64_t end) {
    const scan_ctx *ctx = p;
    const vz_fpmode fpmode = vz_ftz_on();
    for (int64_t item = begin; item < end; ++item) {
        if (ctx->independent)
            scan_item(&ctx->jobs[item / ctx->per_job], item % ctx->per_job);
        else
            for (int64_t j = 0; j < ctx->njobs; ++j) scan_item(&ctx->jobs[j], item);
    }
    vz_ftz_restore(fpmode);
    return 0;
}

static int scan_jobs_ok(const vz_scan_args *jobs, int64_t njobs)
{
    for (int64_t j = 0; j < njobs; ++j) {
        const vz_scan_args *a = &jobs[j];
        if (a->dstate > VZ_NMAX || a->dstate < 1 || a->rank > VZ_RMAX || a->groups < 1 || a->dim % a->groups ||
            a->batch != jobs[0].batch || a->dim != jobs[0].dim || (a->ckpt && a->ck_row < a->dim))
            return 0;
    }
    return 1;
}

static scan_ctx scan_context(const vz_scan_args *jobs, int64_t njobs, int64_t independent, int64_t *items)
{
    const int64_t per_job = jobs[0].batch * ((jobs[0].dim + VZ_CB - 1) / VZ_CB);
    *items = independent ? njobs * per_job : per_job;
    return (scan_ctx){jobs, njobs, per_job, independent != 0};
}

/* njobs scans with the same batch and dim (the two directions of a Vim mixer), over nthreads threads. A work
 * item is one batch element and one block of VZ_CB channels. Dependent jobs (here): an item runs that block of
 * every job, job after job (a later job may accumulate into an earlier one's output, or overwrite its input:
 * the same channels of the same batch element, so always on the same thread, in job order). Independent jobs
 * (vz_mixer_tail; no job reads what another writes): the items of job 0, then those of job 1, ..., cut into
 * the threads' contiguous ranges, so with two threads and two directions each thread runs one direction whole
 * and reads only what it wrote itself in the stages before (on a 2-core Xeon, reading and overwriting lines
 * the other core had just written cost the channel split ~25% of the scan's time at 224x224). Returns 0, or
 * -1 when N > VZ_NMAX, rank > VZ_RMAX, dim is not a multiple of G, or the jobs' batch or dim differ. */
int vz_selective_scan_fwd(const vz_scan_args *jobs, int64_t njobs, int64_t nthreads)
{
    if (njobs < 1) return 0;
    if (!scan_jobs_ok(jobs, njobs)) return -1;
    int64_t items;
    const scan_ctx ctx = scan_context(jobs, njobs, 0, &items);
    return vz_parallel(items, nthreads, scan_range, &ctx);
}

/* ---------------------------------------------------------------- the fused Vim mixer's other stages
 *
 * The x-projection: a Linear without bias over rows, out[b, t, m] = sum_k u[b, t, k] w[m, k] (Vim's x_proj), in C
 * so that each direction's projection runs on the thread that wrote its input and then scans its output
 * (independent jobs, as above). u rows have unit stride along k; wt is w transposed, (K, M) with row stride
 * wt_ld >= M rounded up to whole vectors, zero past M (packed once per weight by the caller); out rows have unit stride along m. A block
 * of VZ_GR rows keeps VZ_GR x 3 vectors of sums in registers. Every output is one sum over k in order (FMA), so
 * the result does not depend on the thread count. */
#define VZ_GR (VZ_CB == 16 ? 8 : 4) /* rows per block: 8 x 3 zmm or 4 x 3 ymm accumulators */
typedef struct {
    int64_t batch, rows, K, M;
    const float *u;
    int64_t u_sb, u_sl;
    const float *wt;
    int64_t wt_ld;
    float *out;
    int64_t o_sb, o_sl;
} vz_linear_args;

/* Columns [m0, m0 + NV * VZ_CB) of a block of rows; rows past the last (nr < VZ_GR) re-read the last row and
 * are not stored, so every loop bound is a constant. */
VZ_INLINE void linear_cols(const int NV, const float *const *ur, const float *wt, int64_t K, int64_t ld,
                           int64_t m0, int64_t M, int64_t nr, float *o, int64_t o_sl)
{
    vf acc[VZ_GR][3];
    for (int r = 0; r < VZ_GR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = (vf){0};
    for (int64_t k = 0; k < K; ++k) {
        const float *wk = wt + k * ld + m0;
        vf w3[3];
        for (int v = 0; v < NV; ++v) w3[v] = vz_load(wk + v * VZ_CB);
        for (int r = 0; r < VZ_GR; ++r) {
            const float x = ur[r][k];
            for (int v = 0; v < NV; ++v) acc[r][v] += x * w3[v];
        }
    }
    for (int r = 0; r < nr; ++r)
        for (int v = 0; v < NV; ++v) {
            const int64_t m = m0 + v * VZ_CB;
            if (m + VZ_CB <= M)
                vz_store(o + r * o_sl + m, acc[r][v]);
            else
                for (int c = 0; m + c < M; ++c) o[r * o_sl + m + c] = acc[r][v][c];
        }
}

static void linear_block(const vz_linear_args *a, int64_t b, int64_t t0)
{
    const int64_t K = a->K, M = a->M, Mp = (M + VZ_CB - 1) / VZ_CB * VZ_CB;
    const int64_t nr = a->rows - t0 < VZ_GR ? a->rows - t0 : VZ_GR;
    const float *ur[VZ_GR];
    for (int r = 0; r < VZ_GR; ++r) ur[r] = a->u + b * a->u_sb + (t0 + (r < nr ? r : nr - 1)) * a->u_sl;
    float *o = a->out + b * a->o_sb + t0 * a->o_sl;
    for (int64_t m0 = 0; m0 < Mp; m0 += 3 * VZ_CB) {
        const int64_t nv = (Mp - m0) / VZ_CB;
        if (nv >= 3)
            linear_cols(3, ur, a->wt, K, a->wt_ld, m0, M, nr, o, a->o_sl);
        else if (nv == 2)
            linear_cols(2, ur, a->wt, K, a->wt_ld, m0, M, nr, o, a->o_sl);
        else
            linear_cols(1, ur, a->wt, K, a->wt_ld, m0, M, nr, o, a->o_sl);
    }
}

typedef struct {
    const vz_linear_args *jobs;
    int64_t per_job;
} linear_ctx;

static int linear_range(const void *p, int64_t begin, int64_t end) {
    const linear_ctx *ctx = p;
    for (int64_t item = begin; item < end; ++item) {
        const vz_linear_args *a = &ctx->jobs[item / ctx->per_job];
        const int64_t i = item % ctx->per_job, blocks = (a->rows + VZ_GR - 1) / VZ_GR;
        linear_block(a, i / blocks, (i % blocks) * VZ_GR);
    }
    return 0;
}

static int linear_jobs_ok(const vz_linear_args *jobs, int64_t njobs)
{
    for (int64_t j = 0; j < njobs; ++j)
        if (jobs[j].batch != jobs[0].batch || jobs[j].rows != jobs[0].rows || jobs[j].K < 1 || jobs[j].M < 1 ||
            jobs[j].wt_ld < (jobs[j].M + VZ_CB - 1) / VZ_CB * VZ_CB)
            return 0;
    return 1;
}

/* The gate pass: out = (a + b) * silu(z) over (batch, rows, dim) with unit stride along dim (time strides may be
 * negative: Vim's backward direction is read time-reversed in place). Items are (batch element, block of VZ_GR
 * rows); out may be a, or share memory with z row by row (each row reads before it writes). */
typedef struct {
    int64_t batch, rows, dim;
    const float *a;
    int64_t a_sb, a_sl;
    const float *b;
    int64_t b_sb, b_sl;
    const float *z;
    int64_t z_sb, z_sl;
    float *out;
    int64_t o_sb, o_sl;
} vz_gate_args;

static int gate_range(const void *p, int64_t begin, int64_t end) {
    const vz_gate_args *g = p;
    const vz_fpmode fpmode = vz_ftz_on();
    const int64_t blocks = (g->rows + VZ_GR - 1) / VZ_GR, dim = g->dim;
    for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / blocks, t0 = (item % blocks) * VZ_GR;
        for (int64_t t = t0; t < t0 + VZ_GR && t < g->rows; ++t) {
            const float *a = g->a + bi * g->a_sb + t * g->a_sl, *b = g->b + bi * g->b_sb + t * g->b_sl,
                        *z = g->z + bi * g->z_sb + t * g->z_sl;
            float *o = g->out + bi * g->o_sb + t * g->o_sl;
            int64_t c = 0;
            for (; c + 4 * VZ_CB <= dim; c += 4 * VZ_CB) {  /* four SiLU chains at once */
                vf zv[4];
                for (int v = 0; v < 4; ++v) zv[v] = vz_load(z + c + v * VZ_CB);
                vz_silu_n(zv, 4);
                for (int v = 0; v < 4; ++v)
                    vz_store(o + c + v * VZ_CB, (vz_load(a + c + v * VZ_CB) + vz_load(b + c + v * VZ_CB)) * zv[v]);
            }
            for (; c < dim; c += VZ_CB) {
                const int nc = dim - c < VZ_CB ? (int)(dim - c) : VZ_CB;
                vf av = {0}, bv = {0}, zv = {0};
                for (int k = 0; k < nc; ++k) { av[k] = a[c + k]; bv[k] = b[c + k]; zv[k] = z[c + k]; }
                av = (av + bv) * vz_silu(zv);
                for (int k = 0; k < nc; ++k) o[c + k] = av[k];
            }
        }
    }
    vz_ftz_restore(fpmode);
    return 0;
}

/* ---------------------------------------------------------------- the whole mixer, and a whole Vim block */
#include "../causal_conv1d/_cpu_kernel.c"
#include "../rms_norm/_cpu_kernel.c"

/* Vim's fused mixer, in one parallel region (vz_parallel_stages): the njobs convs conv (causal_conv1d's kernel:
 * conv + bias + SiLU; independent jobs, job after job), then the njobs row Linears lin (x_proj; items (job, batch
 * element, block of VZ_GR rows), job-major), then the njobs scans (as vz_selective_scan_fwd with `independent`),
 * then, when gate is not NULL, the gate pass over (batch element, block of VZ_GR rows). Every item is computed
 * whole by one thread: the result does not depend on the thread count. Returns 0, or -1 for jobs the kernels do
 * not take. */
int vz_mixer(const vz_conv_args *conv, const vz_linear_args *lin, const vz_scan_args *scan, int64_t njobs,
             int64_t independent, const vz_gate_args *gate, int64_t nthreads)
{
    if (njobs < 1) return 0;
    if (!conv_jobs_ok(conv, njobs) || !linear_jobs_ok(lin, njobs) || !scan_jobs_ok(scan, njobs) ||
        lin[0].batch != scan[0].batch || conv[0].batch != scan[0].batch)
        return -1;
    const int64_t conv_per_job = conv[0].batch * ((conv[0].dim + VZ_CB - 1) / VZ_CB);
    const conv_ctx cctx = {conv, njobs, conv_per_job, 1};
    const linear_ctx lctx = {lin, lin[0].batch * ((lin[0].rows + VZ_GR - 1) / VZ_GR)};
    int64_t scan_items;
    const scan_ctx sctx = scan_context(scan, njobs, independent, &scan_items);
    const vz_stage stages[4] = {
        {njobs * conv_per_job, conv_range, &cctx},
        {njobs * lctx.per_job, linear_range, &lctx},
        {scan_items, scan_range, &sctx},
        {gate ? gate->batch * ((gate->rows + VZ_GR - 1) / VZ_GR) : 0, gate_range, gate},
    };
    return vz_parallel_stages(stages, gate ? 4 : 3, nthreads);
}

/* Vim blocks for inference, x <- x + out_proj(mixer(in_proj(rms_norm(x)))) for each layer in turn, in one call:
 * the Python around a block's ~10 op calls cost ~0.4 ms of a Vim-Ti layer's ~1.9 ms at 224x224 inside a model
 * (each call runs cold there: the kernels in between evict the interpreter's data from the caches), and a
 * per-block call still ~0.18 ms. x and out: (rows, dim) contiguous, rows = batch * L. Per layer, the norm writes
 * h, the in-projection xz (rows, 2E), which the mixer's jobs (conv, lin, scan, gate, built by the caller on xz
 * and its scratch memory) turn into y = xz[:, :E] in place; the out-projection writes proj, and the residual add
 * the next layer's input (tmp or out, alternating so that the last layer writes out). The projections are
 * MKL's packed GEMM (cblas_sgemm_compute on weights packed once by the caller with cblas_sgemm_pack: torch's
 * own MKL, passed in as a function pointer): the same bits as nn.Linear (the caller checks), without re-packing
 * the weight at every call, which cost an unpacked sgemm ~20% of a Vim-Ti projection at 224x224. */
typedef void (*vz_gemm_compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                                   const float *b, int ldb, float beta, float *c, int ldc);
typedef struct {
    int64_t rows, dim, inner;  /* batch * L, D, E */
    const float *norm_w;
    float eps;
    const float *in_w, *out_w;  /* (2E, D) and (D, E) as nn.Linear holds them, packed for rows rows */
    float *h, *xz, *proj;       /* (rows, D), (rows, 2E), (rows, D) */
    vz_conv_args conv[2];
    vz_linear_args lin[2];
    vz_scan_args scan[2];
    vz_gate_args gate;
    int64_t use_gate, independent;
    vz_gemm_compute_fn gemm;
} vz_vim_block_args;

/* out (rows, M) = x (rows, K; row stride ldx) @ w^T, w (M, K) packed: nn.Linear without bias (row-major
 * C = A B with B = w^T, the packed operand). */
static void linear_packed(vz_gemm_compute_fn gemm, float *out, int64_t M, const float *w_packed, int64_t K,
                          const float *x, int64_t ldx, int64_t rows)
{
    enum { row_major = 101, no_trans = 111, packed = 151 };  /* CBLAS_LAYOUT, CBLAS_TRANSPOSE, CBLAS_STORAGE */
    gemm(row_major, no_trans, packed, (int)rows, (int)M, (int)K, x, (int)ldx, w_packed, (int)K, 0.0f, out, (int)M);
}

typedef struct {
    const float *a, *b;
    float *out;
    int64_t n;
} add_ctx;

#define VZ_ADD_BLOCK 4096
static int add_range(const void *p, int64_t begin, int64_t end)
{
    const add_ctx *c = p;
    const int64_t stop = end * VZ_ADD_BLOCK < c->n ? end * VZ_ADD_BLOCK : c->n;
    int64_t i = begin * VZ_ADD_BLOCK;
    for (; i + VZ_CB <= stop; i += VZ_CB) vz_store(c->out + i, vz_load(c->a + i) + vz_load(c->b + i));
    for (; i < stop; ++i) c->out[i] = c->a[i] + c->b[i];
    return 0;
}

static int vim_block(const vz_vim_block_args *a, const float *x, float *out, int64_t nthreads)
{
    const int64_t rows = a->rows, D = a->dim, E = a->inner;
    if (rows < 1 || rows > INT32_MAX || D < 1 || E < 1 || a->conv[0].batch * a->conv[0].length != rows ||
        a->conv[0].dim != E)
        return -1;
    const vz_norm_args norm = {rows, D, x, D, a->norm_w, a->h, D, a->eps, 0};
    int status = vz_rms_norm(&norm, nthreads);
    linear_packed(a->gemm, a->xz, 2 * E, a->in_w, D, a->h, D, rows);
    if (vz_mixer(a->conv, a->lin, a->scan, 2, a->independent, a->use_gate ? &a->gate : NULL, nthreads)) return -1;
    linear_packed(a->gemm, a->proj, D, a->out_w, E, a->xz, 2 * E, rows);
    const add_ctx add = {x, a->proj, out, rows * D};
    status |= vz_parallel((rows * D + VZ_ADD_BLOCK - 1) / VZ_ADD_BLOCK, nthreads, add_range, &add);
    return status;
}

/* nlayers blocks (same rows and dim) from x to out; tmp: (rows, dim) scratch, used when nlayers > 1. Returns 0,
 * or -1 (a layer's arguments rejected: out is then not written in full). */
int vz_vim_blocks(const vz_vim_block_args *layers, int64_t nlayers, const float *x, float *out, float *tmp,
                  int64_t nthreads)
{
    const float *src = x;
    for (int64_t i = 0; i < nlayers; ++i) {
        float *dst = (nlayers - 1 - i) % 2 ? tmp : out;
        if (layers[i].rows != layers[0].rows || layers[i].dim != layers[0].dim ||
            vim_block(&layers[i], src, dst, nthreads))
            return -1;
        src = dst;
    }
    return 0;
}
