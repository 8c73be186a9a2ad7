/* Selective-scan forward for the CPU, compiled on first use by visionzoo/ops/selective_scan/_cpu.py.
 *
 * Plain C (no Python or torch headers), called through ctypes. One work item is one batch element and
 * a block of VZ_CB consecutive channels; the state h (N x VZ_CB floats) stays in a local array while the
 * item walks along the sequence, so nothing of size (L, N) is ever written to memory. All arithmetic is
 * on vectors of the VZ_CB = 8 channels (GCC/Clang vector extensions; one AVX2 register: vectors
 * wider than the hardware's make GCC scalarise the comparisons), with exp and log written here as
 * range reduction plus polynomial (a few ulp in fp32) so that no libm call breaks the SIMD code and
 * no -ffast-math is needed.
 *
 * Semantics are those of the reference backend (mamba-ssm's selective_scan_ref):
 *   delta' = softplus(delta + bias)            (softplus optional; bias optional)
 *   h_t    = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t
 *   y_t    = C_t . h_t (+ D u_t)  (* silu(z_t))
 * B and C are shared by the VZ_CB channels of a block (they belong to one group).
 */
#include <stdint.h>
#include <string.h>

#define VZ_CB 8
#define VZ_NMAX 256
#include "../_simd.h"

/* Strides are in elements. u, delta, z: (batch, dim, L) with strides (s_b, s_d, s_l) each;
 * out: (batch, dim, L) with strides o_*; A2: (dim, N) = A * log2(e), contiguous;
 * Bt, Ct: (batch, G, L, N) contiguous; D, bias: (dim,) or NULL; z may be NULL;
 * last_state: (batch, dim, N) contiguous.  Items [item_begin, item_end) of batch * ceil(dim / VZ_CB).
 * out = out_scale * result, or out += out_scale * result with accumulate (the bidirectional scan adds
 * its second direction into the first's output). Time strides may be negative: a pointer to the last
 * step with a negative stride reads or writes a sequence time-reversed without a flipped copy.
 * Returns 0, or -1 when N > VZ_NMAX or dim is not a multiple of G. */
int vz_selective_scan_fwd(
    int64_t batch, int64_t dim, int64_t length, int64_t dstate, int64_t groups,
    const float *u, int64_t u_sb, int64_t u_sd, int64_t u_sl,
    const float *delta, int64_t d_sb, int64_t d_sd, int64_t d_sl,
    const float *A2, const float *Bt, const float *Ct, const float *D, const float *bias,
    const float *z, int64_t z_sb, int64_t z_sd, int64_t z_sl,
    int32_t softplus,
    float *out, int64_t o_sb, int64_t o_sd, int64_t o_sl, float out_scale, int32_t accumulate,
    float *last_state, int64_t item_begin, int64_t item_end)
{
    if (dstate > VZ_NMAX || groups < 1 || dim % groups) return -1;
    const int64_t N = dstate, dg = dim / groups;
    const int64_t blocks = (dim + VZ_CB - 1) / VZ_CB;
    vf h[VZ_NMAX], a2[VZ_NMAX];
    int64_t ch[VZ_CB], grp[VZ_CB];
    const vz_fpmode fpmode = vz_ftz_on();

    for (int64_t item = item_begin; item < item_end; ++item) {
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
        for (int64_t n = 0; n < N; ++n) {
            for (int c = 0; c < VZ_CB; ++c) a2[n][c] = A2[ch[c] * N + n];
            h[n] = (vf){0};
        }
        /* The fast path: the 8 channels of one group (B, C shared by all lanes) stored contiguously along
         * the channel axis (Vim's time-major views). Otherwise lanes are gathered one by one. */
        const int one_group = grp[0] == grp[nc - 1];
        const int dense = nc == VZ_CB && u_sd == 1 && d_sd == 1 && o_sd == 1 && (!z || z_sd == 1);
        const float *ub = u + b * u_sb, *db = delta + b * d_sb, *zb = z ? z + b * z_sb : 0;
        float *ob = out + b * o_sb;
        for (int64_t l = 0; l < length; ++l) {
            vf uv, dv, y = {0};
            if (dense) {
                memcpy(&uv, ub + d0 + l * u_sl, sizeof uv);
                memcpy(&dv, db + d0 + l * d_sl, sizeof dv);
            } else {
                for (int c = 0; c < VZ_CB; ++c) {
                    uv[c] = ub[ch[c] * u_sd + l * u_sl];
                    dv[c] = db[ch[c] * d_sd + l * d_sl];
                }
            }
            dv += bs;
            if (softplus) dv = vz_softplus(dv);
            const vf du = dv * uv;
            if (one_group) {
                const float *Bl = Bt + ((b * groups + grp[0]) * length + l) * N;
                const float *Cl = Ct + ((b * groups + grp[0]) * length + l) * N;
                for (int64_t n = 0; n < N; ++n) {
                    const vf hn = vz_exp2(dv * a2[n]) * h[n] + du * Bl[n];
                    h[n] = hn;
                    y += Cl[n] * hn;
                }
            } else {
                for (int64_t n = 0; n < N; ++n) {
                    vf bn, cn;
                    for (int c = 0; c < VZ_CB; ++c) {
                        const int64_t off = ((b * groups + grp[c]) * length + l) * N + n;
                        bn[c] = Bt[off];
                        cn[c] = Ct[off];
                    }
                    const vf hn = vz_exp2(dv * a2[n]) * h[n] + du * bn;
                    h[n] = hn;
                    y += cn * hn;
                }
            }
            y += dd * uv;
            if (dense) {
                if (zb) {
                    vf zv;
                    memcpy(&zv, zb + d0 + l * z_sl, sizeof zv);
                    y *= vz_silu(zv);
                }
                y *= out_scale;
                if (accumulate) {
                    vf prev;
                    memcpy(&prev, ob + d0 + l * o_sl, sizeof prev);
                    y += prev;
                }
                memcpy(ob + d0 + l * o_sl, &y, sizeof y);
            } else {
                if (zb) {
                    vf zv;
                    for (int c = 0; c < VZ_CB; ++c) zv[c] = zb[ch[c] * z_sd + l * z_sl];
                    y *= vz_silu(zv);
                }
                y *= out_scale;
                for (int c = 0; c < nc; ++c) {
                    float *o = ob + ch[c] * o_sd + l * o_sl;
                    *o = accumulate ? *o + y[c] : y[c];
                }
            }
        }
        for (int c = 0; c < nc; ++c)
            for (int64_t n = 0; n < N; ++n)
                last_state[(b * dim + ch[c]) * N + n] = h[n][c];
    }
    vz_ftz_restore(fpmode);
    return 0;
}
