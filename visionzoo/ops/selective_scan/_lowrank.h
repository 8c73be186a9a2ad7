/* Mamba's dt_proj folded into a scan kernel: one step's delta (before the softplus) for a block of channels,
 *   bias + sum_r dt_w[c, r] dt[r]
 * from the step's low-rank factor dt (rank values, d_sd apart; the same for every channel of the block) and the
 * block's dt_w columns wdt[r] (one vector per r). Four partial sums (one chain of rank dependent FMAs per step
 * was the forward's bound), added in one fixed order: the forward kernel (_cpu_kernel.c) and the backward
 * (_cpu_bwd_kernel.c), which recomputes the forward's states, get bitwise the same delta. Included after
 * _simd.h. */
#ifndef VZ_LOWRANK_H
#define VZ_LOWRANK_H

static inline vf vz_lowrank_delta(vf bias, const float *dt, int64_t d_sd, const vf *wdt, int64_t rank) {
    vf dv = bias, p1 = {0}, p2 = {0}, p3 = {0};
    int64_t r = 0;
    for (; r + 3 < rank; r += 4) {
        dv += dt[r * d_sd] * wdt[r];
        p1 += dt[(r + 1) * d_sd] * wdt[r + 1];
        p2 += dt[(r + 2) * d_sd] * wdt[r + 2];
        p3 += dt[(r + 3) * d_sd] * wdt[r + 3];
    }
    for (; r < rank; ++r) dv += dt[r * d_sd] * wdt[r];
    return dv + ((p1 + p2) + p3);
}

#endif
