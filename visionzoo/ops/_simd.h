/* Shared by the C kernels of visionzoo.ops (included by each op's _cpu_kernel.c, which defines VZ_CB,
 * the lanes of one vector, before including it): a float vector type, lane-wise exp2 / log / softplus
 * / SiLU written as range reduction plus polynomial (no libm calls, so the code stays SIMD without
 * -ffast-math), and a flush-to-zero guard. */
#ifndef VZ_SIMD_H
#define VZ_SIMD_H
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* A vector of VZ_CB floats (GCC/Clang vector extension): the compiler maps it onto the target's SIMD
 * registers (one AVX2 register, half an AVX-512 one, two SSE/NEON ones). Scalars broadcast. */
typedef float vf __attribute__((vector_size(4 * VZ_CB)));
typedef int32_t vi __attribute__((vector_size(4 * VZ_CB)));
#define VSEL(mask, a, b) ((vf)(((vi)(a) & (mask)) | ((vi)(b) & ~(mask))))  /* mask lanes are 0 / -1 */

/* Denormals: with Vim's trained A (down to -16 and below) and large delta, exp(delta A) * h drifts
 * into the denormal range, where x86 arithmetic is ~100x slower. The kernel runs with
 * flush-to-zero / denormals-are-zero set (values below 1.2e-38 become 0) and restores the caller's
 * mode on exit. */
#if defined(__SSE__)
typedef unsigned int vz_fpmode;
static vz_fpmode vz_ftz_on(void) { vz_fpmode old = _mm_getcsr(); _mm_setcsr(old | 0x8040); return old; }
static void vz_ftz_restore(vz_fpmode old) { _mm_setcsr(old); }
#elif defined(__aarch64__)
typedef uint64_t vz_fpmode;
static vz_fpmode vz_ftz_on(void) {
    vz_fpmode old;
    __asm__ volatile("mrs %0, fpcr" : "=r"(old));
    __asm__ volatile("msr fpcr, %0" : : "r"(old | (1ull << 24)));
    return old;
}
static void vz_ftz_restore(vz_fpmode old) { __asm__ volatile("msr fpcr, %0" : : "r"(old)); }
#else
typedef int vz_fpmode;
static vz_fpmode vz_ftz_on(void) { return 0; }
static void vz_ftz_restore(vz_fpmode old) { (void)old; }
#endif

/* 2^x, lane-wise; 0 below 2^-126 (the reference's exp underflows to 0 there too, up to denormals).
 * Round-to-nearest of x with the 1.5 * 2^23 trick (exact for |x| < 2^22), exp of the remainder
 * r = (x - k) ln 2 in [-ln2/2, ln2/2] as 1 + r + r^2 P(r) (Cephes expf coefficients), times 2^k. */
static inline vf vz_exp2(vf x) {
    const vf lo = (vf){0} - 126.0f, hi = (vf){0} + 127.0f;
    vf xc = VSEL(x < lo, lo, x);
    xc = VSEL(xc > hi, hi, xc);
    vf k = (xc + 12582912.0f) - 12582912.0f;
    vf r = (xc - k) * 0.69314718055994530942f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(k, vi) + 127) << 23;
    return VSEL(x < lo, (vf){0}, p * (vf)e);
}

/* natural log for finite x > 0, lane-wise: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
 * log(m) = f - f^2/2 + f^3 P(f), f = m - 1 (Cephes logf coefficients). */
static inline vf vz_log(vf x) {
    vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 127;
    vf m = (vf)((bits & 0x007fffff) | 0x3f800000); /* in [1, 2) */
    vi big = m > 1.41421356237f;
    m = VSEL(big, m * 0.5f, m);
    vf ef = __builtin_convertvector(e - big, vf); /* big is -1 where true */
    vf f = m - 1.0f;
    vf z = f * f;
    vf p = f * 7.0376836292e-2f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    return f + (f * z * p - 0.5f * z) + ef * 0.69314718055994530942f;
}

/* softplus with torch's threshold: x for x > 20, else log(1 + e^x), accurate for very negative x too:
 * log1p(t) = log(u) * t / (u - 1) with u = 1 + t (rounding-error compensation; u == 1 means t). */
static inline vf vz_softplus(vf x) {
    vi large = x > 20.0f;
    vf t = vz_exp2(VSEL(large, (vf){0}, x) * 1.44269504088896340736f);
    vf u = 1.0f + t;
    vi exact = u == 1.0f;
    vf l = VSEL(exact, t, vz_log(u) * (t / VSEL(exact, (vf){0} + 1.0f, u - 1.0f)));
    return VSEL(large, x, l);
}

static inline vf vz_silu(vf x) {
    return x / (1.0f + vz_exp2(x * -1.44269504088896340736f));
}

#endif
