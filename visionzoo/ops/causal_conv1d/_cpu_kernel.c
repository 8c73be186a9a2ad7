/* Depthwise causal conv1d (+ bias, + optional SiLU) for the CPU, compiled on first use by
 * visionzoo/ops/causal_conv1d/_cpu.py and called through ctypes.
 *
 *   out[b, c, t] = act(bias[c] + sum_k w[c, k] * x[b, c, t - (K - 1) + k])      (x = 0 before t = 0)
 *
 * One work item is one batch element and a block of VZ_CB channels (of every job); it walks along t keeping the last
 * K - 1 inputs in a small window, so every input is read once and every output written once (the shifted
 * PyTorch path reads and writes the whole tensor K + 1 times). Vectors over channels: loads and stores
 * are contiguous when the channel stride is 1 (time-major (batch, L, dim) memory, Vim's layout).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VZ_CB 16 /* one AVX-512 register: a block is one cache line of a time-major row */
#else
#define VZ_CB 8 /* one AVX2 register */
#endif
#define VZ_KMAX 16
#define VZ_IL 4 /* steps per group */
#define VZ_PF 16 /* steps ahead to prefetch */
#include "../_simd.h"

/* One work item: batch element b, channels [d0, d0 + nc). Inlined twice, with K = 4 (Mamba's and Vim's
 * d_conv, so the tap loops unroll and the window stays in registers) and with K at run time. */
VZ_INLINE void conv_item(const int64_t K, const int64_t length, const int64_t d0, const int64_t nc,
                         const int dense, const float *xb, const int64_t x_sd, const int64_t x_sl,
                         const float *w, const float *bias, const int32_t silu,
                         float *ob, const int64_t o_sd, const int64_t o_sl)
{
    int64_t ch[VZ_CB];
    /* win[k], k < K - 1: the last K - 1 inputs before the group; then the group's VZ_IL inputs. */
    vf wk[VZ_KMAX], win[VZ_KMAX + VZ_IL], bv = {0};
    for (int c = 0; c < VZ_CB; ++c) {
        ch[c] = d0 + (c < nc ? c : 0);  /* lanes past the last channel repeat d0, never stored */
        bv[c] = bias ? bias[ch[c]] : 0.0f;
    }
    for (int64_t k = 0; k < K; ++k) {
        for (int c = 0; c < VZ_CB; ++c) wk[k][c] = w[ch[c] * K + k];
        win[k] = (vf){0};
    }
    /* Groups of VZ_IL steps: the group's inputs are all read before any of its outputs is written
     * (so out may be x), and the SiLUs of the group interleave (vz_silu_n). */
    for (int64_t t0 = 0; t0 < length; t0 += VZ_IL) {
        const int cnt = length - t0 < VZ_IL ? (int)(length - t0) : VZ_IL;
        vf acc[VZ_IL];
        for (int j = 0; j < VZ_IL; ++j) {
            vf xv = {0};
            if (j < cnt) {
                const int64_t t = t0 + j;
                /* Time-major rows are ~1-3 KB apart: too far for the hardware prefetchers, and at two threads half
                 * of them sit in the other core's cache; asking VZ_PF steps ahead keeps many misses in flight. */
                if (dense && t + VZ_PF < length) __builtin_prefetch(xb + d0 + (t + VZ_PF) * x_sl, 0, 3);
                if (dense)
                    memcpy(&xv, xb + d0 + t * x_sl, sizeof xv);
                else
                    for (int c = 0; c < VZ_CB; ++c) xv[c] = xb[ch[c] * x_sd + t * x_sl];
            }
            win[K - 1 + j] = xv;
        }
        for (int j = 0; j < VZ_IL; ++j) {
            acc[j] = bv;
            for (int64_t k = 0; k < K; ++k) acc[j] += wk[k] * win[j + k];
        }
        if (silu) vz_silu_n(acc, VZ_IL);
        for (int j = 0; j < cnt; ++j) {
            const int64_t t = t0 + j;
            if (dense)
                memcpy(ob + d0 + t * o_sl, &acc[j], sizeof acc[j]);
            else
                for (int c = 0; c < nc; ++c) ob[ch[c] * o_sd + t * o_sl] = acc[j][c];
        }
        for (int64_t k = 0; k + 1 < K; ++k) win[k] = win[k + VZ_IL];
    }
}

/* One conv: x, out: (batch, dim, L) with strides (s_b, s_d, s_l); w: (dim, K) contiguous; bias: (dim,) or
 * NULL. The Python mirror is _cpu.py's ConvArgs. */
typedef struct {
    int64_t batch, dim, length, K;
    const float *x;
    int64_t x_sb, x_sd, x_sl;
    const float *w, *bias;
    float *out;
    int64_t o_sb, o_sd, o_sl;
    int64_t silu;
} vz_conv_args;

typedef struct {
    const vz_conv_args *jobs;
    int64_t njobs, per_job, independent;
} conv_ctx;

static int conv_range(const void *p, int64_t begin, int64_t end) {
    const conv_ctx *ctx = p;
    const vz_fpmode fpmode = vz_ftz_on();
    for (int64_t it = begin; it < end; ++it) {
        const int64_t j0 = ctx->independent ? it / ctx->per_job : 0, j1 = ctx->independent ? j0 + 1 : ctx->njobs;
        const int64_t item = ctx->independent ? it % ctx->per_job : it;
        for (int64_t j = j0; j < j1; ++j) {
            const vz_conv_args *a = &ctx->jobs[j];
            const int64_t blocks = (a->dim + VZ_CB - 1) / VZ_CB;
            const int64_t b = item / blocks, d0 = (item % blocks) * VZ_CB;
            const int64_t nc = a->dim - d0 < VZ_CB ? a->dim - d0 : VZ_CB;
            const int dense = nc == VZ_CB && a->x_sd == 1 && a->o_sd == 1;
            const float *xb = a->x + b * a->x_sb;
            float *ob = a->out + b * a->o_sb;
            if (a->K == 4)
                conv_item(4, a->length, d0, nc, dense, xb, a->x_sd, a->x_sl, a->w, a->bias, a->silu != 0, ob,
                          a->o_sd, a->o_sl);
            else
                conv_item(a->K, a->length, d0, nc, dense, xb, a->x_sd, a->x_sl, a->w, a->bias, a->silu != 0, ob,
                          a->o_sd, a->o_sl);
        }
    }
    vz_ftz_restore(fpmode);
    return 0;
}

/* njobs convs with the same batch and dim over nthreads threads. A work item is one batch element and one
 * block of VZ_CB channels. Dependent jobs (independent = 0): an item runs that block of every job, job after
 * job (so a later job may overwrite an earlier one's input). Independent jobs: the items of job 0, then of
 * job 1, ..., over the threads' contiguous ranges (two threads, two directions: one direction per thread; see
 * vz_selective_scan_fwd). Returns 0, or -1 when K > VZ_KMAX or the jobs' batch or dim differ. */
static int conv_jobs_ok(const vz_conv_args *jobs, int64_t njobs)
{
    for (int64_t j = 0; j < njobs; ++j)
        if (jobs[j].K < 1 || jobs[j].K > VZ_KMAX || jobs[j].batch != jobs[0].batch || jobs[j].dim != jobs[0].dim)
            return 0;
    return 1;
}

int vz_causal_conv1d_fwd(const vz_conv_args *jobs, int64_t njobs, int64_t nthreads, int64_t independent)
{
    if (njobs < 1) return 0;
    if (!conv_jobs_ok(jobs, njobs)) return -1;
    const int64_t per_job = jobs[0].batch * ((jobs[0].dim + VZ_CB - 1) / VZ_CB);
    const conv_ctx ctx = {jobs, njobs, per_job, independent != 0};
    return vz_parallel(independent ? njobs * per_job : per_job, nthreads, conv_range, &ctx);
}

/* ---------------------------------------------------------------- backward
 *
 * With a = bias + sum_k w_k x[t - (K - 1) + k] the pre-activation and g the output's gradient,
 * g' = g * silu'(a) (or g without the SiLU), silu'(a) = s (1 + a (1 - s)), s = sigmoid(a):
 *   dx[s]  = sum_k w_k g'[s + (K - 1) - k]     dw_k = sum_{b,t} g'[t] x[t - (K - 1) + k]     dbias = sum_{b,t} g'[t]
 * One work item is one block of VZ_CB channels over the whole batch (so the sums over b and t of dw and
 * dbias are made by one thread, in one order: the result does not depend on the thread count); it
 * recomputes a step by step (the forward is cheap) and walks t keeping the last K inputs and the last K
 * g' in small windows. dx[s] is final once g'[s + K - 1] is known. The Python mirror is _cpu.py's
 * ConvBwdArgs. With accumulate, dx += instead of = (the bidirectional conv's second job adds the
 * time-reversed direction's gradient into the first's). */
typedef struct {
    int64_t batch, dim, length, K;
    const float *x;
    int64_t x_sb, x_sd, x_sl;
    const float *w, *bias;
    int64_t silu;
    const float *g;
    int64_t g_sb, g_sd, g_sl;
    float *dx;
    int64_t dx_sb, dx_sd, dx_sl;
    int64_t accumulate;
    float *dw, *dbias; /* (dim, K), (dim,): written (never accumulated); dbias may be NULL */
} vz_conv_bwd_args;

static inline vf conv_gather(const float *p, const int64_t *ch, int64_t sd, int dense, int64_t d0) {
    vf v;
    if (dense) {
        memcpy(&v, p + d0, sizeof v);
    } else {
        for (int c = 0; c < VZ_CB; ++c) v[c] = p[ch[c] * sd];
    }
    return v;
}

VZ_INLINE void conv_bwd_item(const vz_conv_bwd_args *a, const int64_t K, const int64_t d0)
{
    const int64_t length = a->length;
    const int64_t nc = a->dim - d0 < VZ_CB ? a->dim - d0 : VZ_CB;
    int64_t ch[VZ_CB];
    vf wk[VZ_KMAX], dwk[VZ_KMAX], xw[VZ_KMAX], gw[VZ_KMAX], bv = {0}, db = {0};
    for (int c = 0; c < VZ_CB; ++c) {
        ch[c] = d0 + (c < nc ? c : 0);
        bv[c] = a->bias ? a->bias[ch[c]] : 0.0f;
    }
    for (int64_t k = 0; k < K; ++k) {
        for (int c = 0; c < VZ_CB; ++c) wk[k][c] = a->w[ch[c] * K + k];
        dwk[k] = (vf){0};
    }
    const int xd = nc == VZ_CB && a->x_sd == 1, gd = nc == VZ_CB && a->g_sd == 1, dd = nc == VZ_CB && a->dx_sd == 1;
    for (int64_t b = 0; b < a->batch; ++b) {
        const float *xb = a->x + b * a->x_sb, *gb = a->g + b * a->g_sb;
        float *dxb = a->dx + b * a->dx_sb;
        for (int64_t k = 0; k < K; ++k) xw[k] = gw[k] = (vf){0};
        /* xw[K-1] is x[t], xw[k] is x[t - (K - 1) + k]; gw[0] is g'[t], gw[k] is g'[t - k]. */
        for (int64_t t = 0; t < length + K - 1; ++t) {
            for (int64_t k = K - 1; k > 0; --k) gw[k] = gw[k - 1];
            if (t < length) {
                for (int64_t k = 0; k + 1 < K; ++k) xw[k] = xw[k + 1];
                xw[K - 1] = conv_gather(xb + t * a->x_sl, ch, a->x_sd, xd, d0);
                vf gv = conv_gather(gb + t * a->g_sl, ch, a->g_sd, gd, d0);
                if (a->silu) {
                    vf pre = bv;
                    for (int64_t k = 0; k < K; ++k) pre += wk[k] * xw[k];
                    const vf s = 1.0f / (1.0f + vz_exp2(pre * -1.44269504088896340736f));
                    gv *= s * (1.0f + pre * (1.0f - s));
                }
                gw[0] = gv;
                db += gv;
                for (int64_t k = 0; k < K; ++k) dwk[k] += gv * xw[k];
            } else {
                gw[0] = (vf){0};
            }
            const int64_t s = t - (K - 1);
            if (s < 0) continue;
            vf dxv = {0};
            for (int64_t k = 0; k < K; ++k) dxv += wk[k] * gw[k];
            float *o = dxb + s * a->dx_sl;
            if (dd) {
                if (a->accumulate) {
                    vf prev;
                    memcpy(&prev, o + d0, sizeof prev);
                    dxv += prev;
                }
                memcpy(o + d0, &dxv, sizeof dxv);
            } else {
                for (int c = 0; c < nc; ++c) o[ch[c] * a->dx_sd] = a->accumulate ? o[ch[c] * a->dx_sd] + dxv[c] : dxv[c];
            }
        }
    }
    for (int c = 0; c < nc; ++c) {
        for (int64_t k = 0; k < K; ++k) a->dw[ch[c] * K + k] = dwk[k][c];
        if (a->dbias) a->dbias[ch[c]] = db[c];
    }
}

typedef struct {
    const vz_conv_bwd_args *jobs;
    int64_t njobs;
} conv_bwd_ctx;

static int conv_bwd_range(const void *p, int64_t begin, int64_t end) {
    const conv_bwd_ctx *ctx = p;
    const vz_fpmode fpmode = vz_ftz_on();
    for (int64_t item = begin; item < end; ++item)
        for (int64_t j = 0; j < ctx->njobs; ++j) {
            const vz_conv_bwd_args *a = &ctx->jobs[j];
            if (a->K == 4)
                conv_bwd_item(a, 4, item * VZ_CB);
            else
                conv_bwd_item(a, a->K, item * VZ_CB);
        }
    vz_ftz_restore(fpmode);
    return 0;
}

/* njobs conv backwards with the same batch and dim over nthreads threads: a work item is one block of
 * VZ_CB channels of every job, job after job (a later job may accumulate into an earlier one's dx).
 * Returns 0, or -1 when K > VZ_KMAX or the jobs' batch or dim differ. */
int vz_causal_conv1d_bwd(const vz_conv_bwd_args *jobs, int64_t njobs, int64_t nthreads)
{
    if (njobs < 1) return 0;
    for (int64_t j = 0; j < njobs; ++j)
        if (jobs[j].K < 1 || jobs[j].K > VZ_KMAX || jobs[j].batch != jobs[0].batch || jobs[j].dim != jobs[0].dim)
            return -1;
    const conv_bwd_ctx ctx = {jobs, njobs};
    return vz_parallel((jobs[0].dim + VZ_CB - 1) / VZ_CB, nthreads, conv_bwd_range, &ctx);
}
