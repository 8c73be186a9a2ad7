/* Sparsifiner's key selection on CPU, one query row per step (see _keys_cpu.py).

   For row r: score[n] = sum_j w[r, j] * table[cols[r, j], n] over the T kept coefficients, summed in
   the given (ascending) order with fused multiply-adds, the order of the dense product coef @ basis
   whose other terms are exact zeros. The K-th largest score tau is found with a 256-bucket histogram
   over [min, max] (the bucket index is a non-decreasing function of the score, so only the bucket
   holding rank K needs an exact selection, a quickselect over its few members); the indices of the
   scores > tau, then of the lowest-indexed scores == tau, are written in ascending order. */
#include <math.h>
#include <stdint.h>

#define VZ_NMAX 8192
#define VZ_BUCKETS 256
#define VZ_CB 8 /* _simd.h's vector width (unused here; the header gives vz_parallel) */
#include "../_simd.h"

static float kth_largest(float *a, int64_t n, int64_t k) {
    /* value of rank k (0 = largest) of a[0..n); reorders a */
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi], pivot;
        if ((x >= y) == (y >= z)) pivot = y;
        else if ((y >= x) == (x >= z)) pivot = x;
        else pivot = z;
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i]; a[i] = a[j]; a[j] = t;
                i++; j--;
            }
        }
        /* a[lo..j] >= pivot, a[i..hi] <= pivot, a[j+1..i-1] == pivot */
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return pivot;
    }
    return a[k];
}

typedef struct {
    int64_t T, N, K;
    const int64_t *cols;
    const float *w, *table;
    int64_t *out;
} keys_ctx;

/* Rows [begin, end). Returns 0, or 2 on NaN / inf scores, 3 if a row's selection came out short. */
static int keys_range(const void *p, int64_t begin, int64_t end) {
    const keys_ctx *ctx = p;
    const int64_t T = ctx->T, N = ctx->N, K = ctx->K;
    const int64_t *cols = ctx->cols;
    const float *w = ctx->w, *table = ctx->table;
    int64_t *out = ctx->out;
    float score[VZ_NMAX], work[VZ_NMAX];
    int32_t bucket[VZ_NMAX];
    int64_t count[VZ_BUCKETS];
    for (int64_t r = begin; r < end; ++r) {
        const int64_t *c = cols + r * T;
        const float *wr = w + r * T;
        for (int64_t n = 0; n < N; ++n) score[n] = 0.0f;
        for (int64_t j = 0; j < T; ++j) {
            const float *b = table + c[j] * N;
            const float a = wr[j];
            for (int64_t n = 0; n < N; ++n) score[n] = fmaf(a, b[n], score[n]);
        }
        float mn = score[0], mx = score[0];
        for (int64_t n = 1; n < N; ++n) {
            mn = score[n] < mn ? score[n] : mn;
            mx = score[n] > mx ? score[n] : mx;
        }
        if (!(mn <= mx) || isinf(mn) || isinf(mx)) return 2; /* NaN or inf scores */
        float tau;
        if (mx == mn) {
            tau = mx;
        } else {
            const float sc = (float)(VZ_BUCKETS - 1) / (mx - mn);
            for (int64_t i = 0; i < VZ_BUCKETS; ++i) count[i] = 0;
            for (int64_t n = 0; n < N; ++n) {
                int32_t q = (int32_t)((score[n] - mn) * sc);
                q = q < 0 ? 0 : (q > VZ_BUCKETS - 1 ? VZ_BUCKETS - 1 : q);
                bucket[n] = q;
                count[q]++;
            }
            int64_t above = 0, q = VZ_BUCKETS - 1;
            while (above + count[q] < K) above += count[q--];
            int64_t m = 0;
            for (int64_t n = 0; n < N; ++n)
                if (bucket[n] == q) work[m++] = score[n];
            tau = kth_largest(work, m, K - 1 - above);
        }
        int64_t above = 0;
        for (int64_t n = 0; n < N; ++n) above += score[n] > tau;
        int64_t ties = K - above, m = 0;
        int64_t *o = out + r * K;
        for (int64_t n = 0; n < N; ++n) {
            if (score[n] > tau) o[m++] = n;
            else if (score[n] == tau && ties > 0) { o[m++] = n; ties--; }
        }
        if (m != K) return 3;
    }
    return 0;
}

/* rows query rows over nthreads threads (each row on one thread). Returns 0, 1 when N or K is out of
 * range, else keys_range's status. */
int vz_sparsifiner_keys(int64_t T, int64_t N, int64_t K, const int64_t *cols, const float *w,
                        const float *table, int64_t *out, int64_t rows, int64_t nthreads) {
    if (N < 1 || N > VZ_NMAX || K < 1 || K > N) return 1;
    const keys_ctx ctx = {T, N, K, cols, w, table, out};
    return vz_parallel(rows, nthreads, keys_range, &ctx);
}
