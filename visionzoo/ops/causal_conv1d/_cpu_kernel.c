/* Depthwise causal conv1d (+ bias, + optional SiLU) for the CPU, compiled on first use by
 * visionzoo/ops/causal_conv1d/_cpu.py and called through ctypes.
 *
 *   out[b, c, t] = act(bias[c] + sum_k w[c, k] * x[b, c, t - (K - 1) + k])      (x = 0 before t = 0)
 *
 * One work item is one batch element and a block of VZ_CB channels; it walks along t keeping the last
 * K - 1 inputs in registers, so every input is read once and every output written once (the shifted
 * PyTorch path reads and writes the whole tensor K + 1 times). Vectors over channels: loads and stores
 * are contiguous when the channel stride is 1 (time-major (batch, L, dim) memory, Vim's layout).
 */
#include <stdint.h>
#include <string.h>

#define VZ_CB 8
#define VZ_KMAX 16
#include "../_simd.h"

/* x, out: (batch, dim, L) with strides (s_b, s_d, s_l); w: (dim, K) contiguous; bias: (dim,) or NULL.
 * Items [item_begin, item_end) of batch * ceil(dim / VZ_CB). Returns 0, or -1 when K > VZ_KMAX. */
int vz_causal_conv1d_fwd(
    int64_t batch, int64_t dim, int64_t length, int64_t K,
    const float *x, int64_t x_sb, int64_t x_sd, int64_t x_sl,
    const float *w, const float *bias, int32_t silu,
    float *out, int64_t o_sb, int64_t o_sd, int64_t o_sl,
    int64_t item_begin, int64_t item_end)
{
    if (K < 1 || K > VZ_KMAX) return -1;
    const int64_t blocks = (dim + VZ_CB - 1) / VZ_CB;
    const vz_fpmode fpmode = vz_ftz_on();
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * VZ_CB;
        const int64_t nc = dim - d0 < VZ_CB ? dim - d0 : VZ_CB;
        const int dense = nc == VZ_CB && x_sd == 1 && o_sd == 1;
        int64_t ch[VZ_CB];
        vf wk[VZ_KMAX], hist[VZ_KMAX], bv = {0};
        for (int c = 0; c < VZ_CB; ++c) {
            ch[c] = d0 + (c < nc ? c : 0);  /* lanes past the last channel repeat d0, never stored */
            bv[c] = bias ? bias[ch[c]] : 0.0f;
        }
        for (int64_t k = 0; k < K; ++k) {
            for (int c = 0; c < VZ_CB; ++c) wk[k][c] = w[ch[c] * K + k];
            hist[k] = (vf){0};  /* hist[k] = x[t - (K - 1) + k]; hist[K - 1] is the current input */
        }
        const float *xb = x + b * x_sb;
        float *ob = out + b * o_sb;
        for (int64_t t = 0; t < length; ++t) {
            for (int64_t k = 0; k + 1 < K; ++k) hist[k] = hist[k + 1];
            vf xv;
            if (dense) {
                memcpy(&xv, xb + d0 + t * x_sl, sizeof xv);
            } else {
                for (int c = 0; c < VZ_CB; ++c) xv[c] = xb[ch[c] * x_sd + t * x_sl];
            }
            hist[K - 1] = xv;
            vf acc = bv;
            for (int64_t k = 0; k < K; ++k) acc += wk[k] * hist[k];
            if (silu) acc = vz_silu(acc);
            if (dense) {
                memcpy(ob + d0 + t * o_sl, &acc, sizeof acc);
            } else {
                for (int c = 0; c < nc; ++c) ob[ch[c] * o_sd + t * o_sl] = acc[c];
            }
        }
    }
    vz_ftz_restore(fpmode);
    return 0;
}
