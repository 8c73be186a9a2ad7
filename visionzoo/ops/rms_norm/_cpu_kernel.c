/* RMSNorm over the last dimension for the CPU, compiled on first use by visionzoo/ops/rms_norm/_cpu.py:
 *
 *   out[r, :] = x[r, :] * (1 / sqrt(sum_d x[r, d]^2 / D + eps)) * w
 *
 * x and out are (rows, D) with unit stride along D and row strides x_sr / o_sr (elements); w is (D,) or NULL.
 * With out_bf16, out holds bfloat16 (uint16) values: the fp32 result rounded to nearest even, as torch's
 * fp32 -> bf16 conversion does (an autocast model's next Linear would cast it so; NaN stays a quiet NaN).
 * One pass over each row for the sum of squares (VZ_CB partial sums, then added in a fixed order) and one
 * for the output: every row is computed whole by one thread, so the result does not depend on the thread
 * count. Work items are blocks of 8 rows. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VZ_CB 16
#else
#define VZ_CB 8
#endif
#include "../_simd.h"

typedef struct {
    int64_t rows, dim;
    const float *x;
    int64_t x_sr;
    const float *w;
    void *out;
    int64_t o_sr;
    float eps;
    int32_t out_bf16;
} vz_norm_args;

static inline uint16_t vz_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN: keep it quiet */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define VZ_ROWS 8

static int norm_range(const void *p, int64_t begin, int64_t end)
{
    const vz_norm_args *a = p;
    const int64_t D = a->dim;
    for (int64_t item = begin; item < end; ++item)
        for (int64_t r = item * VZ_ROWS; r < (item + 1) * VZ_ROWS && r < a->rows; ++r) {
            const float *x = a->x + r * a->x_sr;
            vf s0 = {0}, s1 = {0};
            int64_t d = 0;
            for (; d + 2 * VZ_CB <= D; d += 2 * VZ_CB) {
                const vf v0 = vz_load(x + d), v1 = vz_load(x + d + VZ_CB);
                s0 += v0 * v0;
                s1 += v1 * v1;
            }
            s0 += s1;
            float ss = 0.0f;
            for (int c = 0; c < VZ_CB; ++c) ss += s0[c];
            for (; d < D; ++d) ss += x[d] * x[d];
            const float inv = 1.0f / sqrtf(ss / (float)D + a->eps);
            if (a->out_bf16) {
                uint16_t *o = (uint16_t *)a->out + r * a->o_sr;
                for (d = 0; d < D; ++d) o[d] = vz_bf16(a->w ? x[d] * inv * a->w[d] : x[d] * inv);
                continue;
            }
            float *o = (float *)a->out + r * a->o_sr;
            d = 0;
            for (; d + VZ_CB <= D; d += VZ_CB) {
                const vf y = vz_load(x + d) * inv;
                vz_store(o + d, a->w ? y * vz_load(a->w + d) : y);
            }
            for (; d < D; ++d) o[d] = a->w ? x[d] * inv * a->w[d] : x[d] * inv;
        }
    return 0;
}

int vz_rms_norm(const vz_norm_args *a, int64_t nthreads)
{
    return vz_parallel((a->rows + VZ_ROWS - 1) / VZ_ROWS, nthreads, norm_range, a);
}
