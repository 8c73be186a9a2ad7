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

#define VZ_CB 8
#define VZ_KMAX 16
#define VZ_IL 4 /* steps per group */
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
    int64_t njobs;
} conv_ctx;

static int conv_range(const void *p, int64_t begin, int64_t end) {
    const conv_ctx *ctx = p;
    const vz_fpmode fpmode = vz_ftz_on();
    for (int64_t item = begin; item < end; ++item)
        for (int64_t j = 0; j < ctx->njobs; ++j) {
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
    vz_ftz_restore(fpmode);
    return 0;
}

/* njobs convs with the same batch and dim over nthreads threads. A work item is one batch element and one
 * block of VZ_CB channels of every job, job after job (so a later job may overwrite an earlier one's input:
 * the fused Vim path convolves x reversed into a new buffer, then x in place). Returns 0, or -1 when
 * K > VZ_KMAX or the jobs' batch or dim differ. */
int vz_causal_conv1d_fwd(const vz_conv_args *jobs, int64_t njobs, int64_t nthreads)
{
    if (njobs < 1) return 0;
    for (int64_t j = 0; j < njobs; ++j)
        if (jobs[j].K < 1 || jobs[j].K > VZ_KMAX || jobs[j].batch != jobs[0].batch || jobs[j].dim != jobs[0].dim)
            return -1;
    const conv_ctx ctx = {jobs, njobs};
    return vz_parallel(jobs[0].batch * ((jobs[0].dim + VZ_CB - 1) / VZ_CB), nthreads, conv_range, &ctx);
}
