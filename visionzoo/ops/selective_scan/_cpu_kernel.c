/* Selective-scan forward for the CPU, compiled on first use by visionzoo/ops/selective_scan/_cpu.py.
 *
 * Plain C (no Python or torch headers), called through ctypes. One work item is one batch element and
 * a block of VZ_CB consecutive channels; the state h (N x VZ_CB floats) stays in a local array while the
 * item walks along the sequence, so nothing of size (L, N) is ever written to memory. The innermost
 * loops run over the VZ_CB channels with no calls, so the compiler turns them into SIMD code
 * (VZ_CB = 16: two AVX2 vectors, one AVX-512 vector). exp is a Cody-Waite range reduction plus a
 * degree-6 polynomial (about 2 ulp in fp32), written here so that it vectorises without -ffast-math.
 *
 * Semantics are those of the reference backend (mamba-ssm's selective_scan_ref):
 *   delta' = softplus(delta + bias)            (softplus optional; bias optional)
 *   h_t    = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t
 *   y_t    = C_t . h_t (+ D u_t)  (* silu(z_t))
 * B and C are shared by the VZ_CB channels of a block (they belong to one group).
 */
#include <stdint.h>
#include <string.h>

#define VZ_CB 16
#define VZ_NMAX 256

typedef union { float f; int32_t i; } vz_bits;

/* 2^x for x in float; 0 below 2^-126 (the reference's exp underflows to 0 there too, up to denormals). */
static inline float vz_exp2(float x) {
    const float hi = 127.0f, lo = -126.0f;
    float xc = x > hi ? hi : (x < lo ? lo : x);
    /* round to nearest integer with the 1.5 * 2^23 trick (exact for |xc| < 2^22) */
    const float magic = 12582912.0f;
    float k = (xc + magic) - magic;
    float r = (xc - k) * 0.69314718055994530942f; /* |r| <= ln2 / 2 */
    /* exp(r) = 1 + r + r^2 P(r): Cephes expf coefficients */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vz_bits s;
    s.i = ((int32_t)k + 127) << 23;
    float v = p * s.f;
    return x < lo ? 0.0f : v;
}

/* natural log for x > 0 (finite): Cephes logf polynomial on the mantissa in [sqrt(1/2), sqrt(2)). */
static inline float vz_log(float x) {
    vz_bits b;
    b.f = x;
    int32_t e = ((b.i >> 23) & 0xff) - 127;
    b.i = (b.i & 0x007fffff) | 0x3f800000; /* mantissa in [1, 2) */
    float m = b.f;
    int big = m > 1.41421356237f;
    m = big ? m * 0.5f : m;
    float ef = (float)(e + big);
    float f = m - 1.0f;
    float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float y = f * z * p - 0.5f * z;
    return f + y + ef * 0.69314718055994530942f;
}

/* softplus with torch's threshold: x for x > 20, else log(1 + e^x), accurate for very negative x too. */
static inline float vz_softplus(float x) {
    float t = vz_exp2((x > 20.0f ? 0.0f : x) * 1.44269504088896340736f);
    float u = 1.0f + t;
    /* log1p(t) = log(u) * t / (u - 1): exact rounding-error compensation; u == 1 means log1p(t) = t */
    float l = u == 1.0f ? t : vz_log(u) * (t / (u - 1.0f));
    return x > 20.0f ? x : l;
}

static inline float vz_silu(float x) {
    return x / (1.0f + vz_exp2(-x * 1.44269504088896340736f));
}

/* Strides are in elements. u, delta, z: (batch, dim, L) with strides (s_b, s_d, s_l) each;
 * out: (batch, dim, L) with strides o_*; A2: (dim, N) = A * log2(e), contiguous;
 * Bt, Ct: (batch, G, L, N) contiguous; D, bias: (dim,) or NULL; z may be NULL;
 * last_state: (batch, dim, N) contiguous.  Items [item_begin, item_end) of batch * ceil(dim / VZ_CB).
 * Returns 0, or -1 when N > VZ_NMAX or dim is not a multiple of G. */
int vz_selective_scan_fwd(
    int64_t batch, int64_t dim, int64_t length, int64_t dstate, int64_t groups,
    const float *u, int64_t u_sb, int64_t u_sd, int64_t u_sl,
    const float *delta, int64_t d_sb, int64_t d_sd, int64_t d_sl,
    const float *A2, const float *Bt, const float *Ct, const float *D, const float *bias,
    const float *z, int64_t z_sb, int64_t z_sd, int64_t z_sl,
    int32_t softplus,
    float *out, int64_t o_sb, int64_t o_sd, int64_t o_sl,
    float *last_state, int64_t item_begin, int64_t item_end)
{
    if (dstate > VZ_NMAX || groups < 1 || dim % groups) return -1;
    const int64_t N = dstate, dg = dim / groups;
    const int64_t blocks = (dim + VZ_CB - 1) / VZ_CB;
    float h[VZ_NMAX][VZ_CB];
    float a2[VZ_NMAX][VZ_CB];
    float dt[VZ_CB], du[VZ_CB], y[VZ_CB], dd[VZ_CB], bs[VZ_CB];
    int64_t ch[VZ_CB], grp[VZ_CB];

    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, d0 = (item % blocks) * VZ_CB;
        const int64_t nc = dim - d0 < VZ_CB ? dim - d0 : VZ_CB;
        /* Lanes past the last channel repeat channel d0 and are never stored. */
        for (int c = 0; c < VZ_CB; ++c) {
            ch[c] = d0 + (c < nc ? c : 0);
            grp[c] = ch[c] / dg;
            dd[c] = D ? D[ch[c]] : 0.0f;
            bs[c] = bias ? bias[ch[c]] : 0.0f;
        }
        /* Blocks never straddle a group when dg is a multiple of VZ_CB (the fast path); otherwise
         * every lane reads B/C of its own group (slower, still exact). */
        int one_group = grp[0] == grp[VZ_CB - 1] && grp[0] == grp[nc - 1];
        for (int64_t n = 0; n < N; ++n)
            for (int c = 0; c < VZ_CB; ++c) {
                a2[n][c] = A2[ch[c] * N + n];
                h[n][c] = 0.0f;
            }
        const float *ub = u + b * u_sb, *db = delta + b * d_sb, *zb = z ? z + b * z_sb : 0;
        float *ob = out + b * o_sb;
        for (int64_t l = 0; l < length; ++l) {
            for (int c = 0; c < VZ_CB; ++c) {
                float x = db[ch[c] * d_sd + l * d_sl] + bs[c];
                dt[c] = softplus ? vz_softplus(x) : x;
                du[c] = dt[c] * ub[ch[c] * u_sd + l * u_sl];
                y[c] = 0.0f;
            }
            if (one_group) {
                const float *Bl = Bt + ((b * groups + grp[0]) * length + l) * N;
                const float *Cl = Ct + ((b * groups + grp[0]) * length + l) * N;
                for (int64_t n = 0; n < N; ++n) {
                    const float bn = Bl[n], cn = Cl[n];
                    for (int c = 0; c < VZ_CB; ++c) {
                        float hn = vz_exp2(dt[c] * a2[n][c]) * h[n][c] + du[c] * bn;
                        h[n][c] = hn;
                        y[c] += cn * hn;
                    }
                }
            } else {
                for (int64_t n = 0; n < N; ++n)
                    for (int c = 0; c < VZ_CB; ++c) {
                        const int64_t off = ((b * groups + grp[c]) * length + l) * N + n;
                        float hn = vz_exp2(dt[c] * a2[n][c]) * h[n][c] + du[c] * Bt[off];
                        h[n][c] = hn;
                        y[c] += Ct[off] * hn;
                    }
            }
            for (int c = 0; c < nc; ++c) {
                float v = y[c] + dd[c] * ub[ch[c] * u_sd + l * u_sl];
                if (zb) v *= vz_silu(zb[ch[c] * z_sd + l * z_sl]);
                ob[ch[c] * o_sd + l * o_sl] = v;
            }
        }
        for (int c = 0; c < nc; ++c)
            for (int64_t n = 0; n < N; ++n)
                last_state[(b * dim + ch[c]) * N + n] = h[n][c];
    }
    return 0;
}
