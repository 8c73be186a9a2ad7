/* Shared by the C kernels of visionzoo.ops (included by each op's _cpu_kernel.c, which defines VZ_CB,
 * the lanes of one vector, before including it): a float vector type, lane-wise exp2 / softplus
 * / SiLU written as range reduction plus polynomial (no libm calls, so the code stays SIMD without
 * -ffast-math), and a flush-to-zero guard. */
#ifndef VZ_SIMD_H
#define VZ_SIMD_H
#include <stdint.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

/* A stage runs fn(ctx, begin, end) over [0, items) cut into nthreads contiguous ranges, one per thread. Built with
 * -fopenmp (see _cpu_build.py), the threads are OpenMP's: in a torch process the same libgomp, and so the same
 * thread pool, as torch's intra-op threads (no second set of threads competing with torch's spinning ones for
 * the cores). Which thread runs a range changes nothing in the result: every item is computed whole by one
 * thread, in the same order of operations. Without OpenMP everything runs on the calling thread. */
typedef int (*vz_range_fn)(const void *ctx, int64_t begin, int64_t end);
typedef struct {
    int64_t items;
    vz_range_fn fn;
    const void *ctx;
} vz_stage;

/* Several stages in one parallel region, every thread waiting for all others (a barrier) before the next stage,
 * which may read anything an earlier stage wrote. One region instead of one per stage: a region's start and
 * end cost ~5-10 us on a small VM, and Vim's fused mixer has four stages per layer. Returns the first non-zero
 * status (the later stages still run). */
static int vz_parallel_stages(const vz_stage *stages, int64_t nstages, int64_t nthreads) {
    int64_t most = 1;
    for (int64_t s = 0; s < nstages; ++s) most = stages[s].items > most ? stages[s].items : most;
    if (nthreads > most) nthreads = most;
    if (nthreads > 256) nthreads = 256;
#if defined(_OPENMP)
    if (nthreads > 1) {
        int status[256] = {0};
#pragma omp parallel num_threads((int)nthreads)
        {
            const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
            for (int64_t s = 0; s < nstages; ++s) {
                const int64_t items = stages[s].items;
                const int st = stages[s].fn(stages[s].ctx, items * t / n, items * (t + 1) / n);
                if (st && !status[t]) status[t] = st;
                if (s + 1 < nstages) {
#pragma omp barrier
                }
            }
        }
        for (int64_t t = 0; t < nthreads; ++t)
            if (status[t]) return status[t];
        return 0;
    }
#endif
    int status = 0;
    for (int64_t s = 0; s < nstages; ++s) {
        const int st = stages[s].fn(stages[s].ctx, 0, stages[s].items);
        if (st && !status) status = st;
    }
    return status;
}

/* One stage: fn over [0, items) on nthreads threads; its status. */
static int vz_parallel(int64_t items, int64_t nthreads, vz_range_fn fn, const void *ctx) {
    const vz_stage stage = {items, fn, ctx};
    return vz_parallel_stages(&stage, 1, nthreads);
}
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* A vector of VZ_CB floats (GCC/Clang vector extension): the compiler maps it onto the target's SIMD
 * registers (one AVX2 register, half an AVX-512 one, two SSE/NEON ones). Scalars broadcast. */
typedef float vf __attribute__((vector_size(4 * VZ_CB)));
typedef int32_t vi __attribute__((vector_size(4 * VZ_CB)));
/* One vector from / to unaligned memory (a single vector move). Copying several vectors with one memcpy made
 * GCC move them through the stack in halves, and the full-width reloads then stalled on store forwarding. */
static inline vf vz_load(const float *p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void vz_store(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
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

/* Whether every lane of a comparison result is true. */
#if defined(__AVX__) && VZ_CB == 8
#include <immintrin.h>
static inline int vz_all(vi mask) { return _mm256_movemask_ps((__m256)mask) == 0xff; }
#elif defined(__AVX512F__) && VZ_CB == 16
#include <immintrin.h>
static inline int vz_all(vi mask) { return _mm512_cmpneq_epi32_mask((__m512i)mask, _mm512_setzero_si512()) == 0xffff; }
#else
static inline int vz_all(vi mask) {
    int all = 1;
    for (int c = 0; c < VZ_CB; ++c) all &= mask[c] != 0;
    return all;
}
#endif

/* Lane-wise max / min that propagate a NaN in x (one instruction each on AVX; a select elsewhere). */
#if defined(__AVX__) && VZ_CB == 8
#include <immintrin.h>
static inline vf vz_max(vf x, float lo) { return (vf)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)x); }
static inline vf vz_min(vf x, float hi) { return (vf)_mm256_min_ps(_mm256_set1_ps(hi), (__m256)x); }
#elif defined(__AVX512F__) && VZ_CB == 16
static inline vf vz_max(vf x, float lo) { return (vf)_mm512_max_ps(_mm512_set1_ps(lo), (__m512)x); }
static inline vf vz_min(vf x, float hi) { return (vf)_mm512_min_ps(_mm512_set1_ps(hi), (__m512)x); }
#else
static inline vf vz_max(vf x, float lo) { return VSEL(x < lo, (vf){0} + lo, x); }
static inline vf vz_min(vf x, float hi) { return VSEL(x > hi, (vf){0} + hi, x); }
#endif

/* 2^x, lane-wise, within 1.8e-7 relative (2-3 ulp) and exact at x = 0 (no bias near 1, where the scan
 * multiplies thousands of factors exp(delta A) ~ 1 in a row); 0 below 2^-127 (the reference's exp
 * underflows to 0 there too, up to denormals, which the kernels flush), 2^127 * 2^f above 127, NaN
 * stays NaN. x is clamped to [-127, 127] and split as k + f, k = round(x), by adding M = 1.5 * 2^23 + 127:
 * t = x + M holds k + 127 in its low mantissa bits, so (int)t << 23 is 2^k as a float's bits (k = -127
 * gives the bits of 0.0). 2^f = 1 + f q(f) on [-1/2, 1/2], q of degree 4 fitted for minimax relative
 * error. 12 vector instructions: the inner loop of the selective scan computes N of these per step. */
#define VZ_INLINE static inline __attribute__((always_inline))
#define VZ_NMAX_IL 8 /* most vectors one *_n call takes */

/* The *_n functions apply a function to n vectors in place, step by step across the n (n is a constant
 * at every call, so the loops unroll): each function is a chain of ~10-25 dependent instructions, and
 * chains evaluated one after another leave an out-of-order core waiting on latency (its scheduler
 * fills with instructions whose inputs are not ready); n interleaved chains keep its units busy. */
VZ_INLINE void vz_exp2_n(vf *x, int n) {
    vf t[VZ_NMAX_IL], q[VZ_NMAX_IL];
    for (int j = 0; j < n; ++j) x[j] = vz_min(vz_max(x[j], -127.0f), 127.0f);
    for (int j = 0; j < n; ++j) t[j] = x[j] + 12583039.0f;
    for (int j = 0; j < n; ++j) x[j] -= t[j] - 12583039.0f;
    for (int j = 0; j < n; ++j) q[j] = x[j] * 1.330221421e-3f + 9.672933258e-3f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * x[j] + 5.550615117e-2f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * x[j] + 2.402221709e-1f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * x[j] + 6.931470633e-1f;
    for (int j = 0; j < n; ++j) x[j] = (q[j] * x[j] + 1.0f) * (vf)((vi)t[j] << 23);
}

VZ_INLINE vf vz_exp2(vf x) {
    vz_exp2_n(&x, 1);
    return x;
}

/* vz_exp2 for |x| <= 126 only (no clamps; NaN is not handled): the scan's inner loop, after it has
 * checked the whole step's arguments. 2^k is applied by adding k to the exponent field of 2^f
 * (an integer add, leaving the multiply units to the polynomial): t = x + 1.5 * 2^23 holds k in its low
 * mantissa bits, and (int)t << 23 is k << 23 modulo 2^32. A result below 2^-126 comes out as a
 * denormal's bits, which the kernels' denormals-are-zero mode reads as 0, as vz_exp2 gives. */
static inline vf vz_exp2_small(vf x) {
    const vf t = x + 12582912.0f;
    const vf k = t - 12582912.0f;
    const vf f = x - k;
    vf q = f * 1.330221421e-3f + 9.672933258e-3f;
    q = q * f + 5.550615117e-2f;
    q = q * f + 2.402221709e-1f;
    q = q * f + 6.931470633e-1f;
#if defined(__AVX512F__) && VZ_CB == 16
    /* one instruction for the scaling, 2^f * 2^k (vscalefps; its below-2^-126 results flush to 0 in the kernels'
     * mode, where the integer add's denormal bits read as 0): the scan's inner loop ~5% faster */
    return (vf)_mm512_scalef_ps((__m512)(q * f + 1.0f), (__m512)k);
#else
    return (vf)((vi)(q * f + 1.0f) + ((vi)t << 23));
#endif
}

/* softplus with torch's threshold (x for x > 20, else log(1 + e^x)), as max(x, 0) + log1p(e^-|x|):
 * t = e^-|x| is in (0, 1], and log1p(t) = t q(t) with q of degree 8 fitted for minimax relative error
 * (2e-7 in fp32; exact relative behaviour as t -> 0, so softplus of very negative x keeps its digits).
 * No log and no division: above 20 the log1p term is below half an ulp of x, which gives torch's x. */
VZ_INLINE void vz_softplus_n(vf *x, int n) {
    vf t[VZ_NMAX_IL], q[VZ_NMAX_IL];
    for (int j = 0; j < n; ++j) t[j] = (vf)((vi)x[j] & 0x7fffffff) * -1.44269504088896340736f;
    vz_exp2_n(t, n);
    for (int j = 0; j < n; ++j) q[j] = t[j] * 5.287728738e-03f - 2.975706384e-02f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] + 7.869488746e-02f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] - 1.370894164e-01f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] + 1.913091093e-01f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] - 2.485048026e-01f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] + 3.332024217e-01f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] - 4.999956489e-01f;
    for (int j = 0; j < n; ++j) q[j] = q[j] * t[j] + 1.0f;
    for (int j = 0; j < n; ++j) x[j] = vz_max(x[j], 0.0f) + t[j] * q[j];
}

VZ_INLINE vf vz_softplus(vf x) {
    vz_softplus_n(&x, 1);
    return x;
}

/* x * sigmoid(x) = x / (1 + 2^(-x log2 e)) */
VZ_INLINE void vz_silu_n(vf *x, int n) {
    vf e[VZ_NMAX_IL];
    for (int j = 0; j < n; ++j) e[j] = x[j] * -1.44269504088896340736f;
    vz_exp2_n(e, n);
    for (int j = 0; j < n; ++j) x[j] /= 1.0f + e[j];
}

VZ_INLINE vf vz_silu(vf x) {
    vz_silu_n(&x, 1);
    return x;
}

#endif
