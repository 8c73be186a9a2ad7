#!/usr/bin/env python
"""The Vim CPU kernels called directly (one ctypes call, arguments prepared once), and the per-layer
Python overhead of the fused inference path, at Vim-Tiny's size. One thread, process CPU time, minimum
over rounds.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_kernels.py [--length 197] [--rounds 15]

* ``scan``: ``vz_selective_scan_fwd`` over both directions' channels (dim 768 = 2 x 384, N 16, dt_proj
  folded in with rank 12, B/C read from a (L, 44) x-projection, softplus and gate on, time-major rows),
  the work of one Vim-Tiny layer; also per (step, 8 channels, state) update.
* ``conv``: ``vz_causal_conv1d_fwd`` for one direction (384 channels, K 4, SiLU), forward in place and
  reversed, as the fused path runs them.
* ``mixer python``: one ``bimamba_inner`` call (fused path) with its C call replaced by a no-op (``vz_mixer``, which
  holds the convs, the x-projections, the scans and the gate): what the mixer spends outside it. (Models in fp32
  CPU inference call ``vz_vim_blocks`` instead, once for all blocks: see ``benchmarks/threads_cpu.md``.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import visionzoo  # noqa: E402,F401
from visionzoo.ops.causal_conv1d import _cpu as conv_cpu  # noqa: E402
from visionzoo.ops.selective_scan import MambaBranch, bimamba_inner  # noqa: E402
from visionzoo.ops.selective_scan import _cpu as scan_cpu  # noqa: E402


def best_ms(fn, rounds, inner):
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        best = min(best, (time.process_time() - t0) / inner)
    return best * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    L, dim, N, R = args.length, 768, 16, 12
    inner = max(1, 4000 // L)

    lib = scan_cpu.load()
    u, z = (torch.randn(L, dim, generator=g) for _ in range(2))
    out = torch.empty(L, dim)
    x_dbl = torch.randn(L, R + 2 * N, generator=g)  # one (L, R + 2N) projection shared by all channels
    dt_w = torch.randn(dim, R, generator=g) * R ** -0.5
    A_log = torch.randn(dim, N, generator=g) * 0.5 + 0.5
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g) - 2.0
    p0, xs = x_dbl.data_ptr(), R + 2 * N
    job = scan_cpu._job(1, dim, L, N, 1, (u.data_ptr(), 0, 1, dim), (p0, 0, 1, xs), dt_w.data_ptr(), R,
                        A_log.data_ptr(), True, (p0 + 4 * R, 0, 0, 1, xs), (p0 + 4 * (R + N), 0, 0, 1, xs),
                        D.data_ptr(), bias.data_ptr(), (z.data_ptr(), 0, 1, dim), True, (out.data_ptr(), 0, 1, dim),
                        None, 0.5)
    jobs = (scan_cpu.ScanArgs * 1)(job)
    scan = best_ms(lambda: lib.vz_selective_scan_fwd(jobs, 1, 1), args.rounds, inner)
    updates = L * dim * N / 8

    clib = conv_cpu.load()
    E = dim // 2
    xz = torch.randn(L, dim, generator=g)
    ub = torch.empty(L, E)
    w, b = torch.randn(E, 4, generator=g), torch.randn(E, generator=g)
    last = (L - 1) * dim * 4

    def conv():
        conv_cpu.run(clib, [conv_cpu.job(1, E, L, (xz.data_ptr() + last, 0, 1, -dim), w, b, True, (ub.data_ptr(), 0, 1, E)),
                            conv_cpu.job(1, E, L, (xz.data_ptr(), 0, 1, dim), w, b, True, (xz.data_ptr(), 0, 1, dim))])

    conv_ms = best_ms(conv, args.rounds, inner)

    mixer = timm.create_model("vim_tiny").eval().blocks[0].mixer
    branches = (MambaBranch(mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D),
                MambaBranch(mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b))
    xz3 = torch.randn(1, L, dim, generator=g)
    real = lib.vz_mixer
    with torch.no_grad():
        lib.vz_mixer = lambda *a: 0
        try:
            total = best_ms(lambda: bimamba_inner(xz3, *branches), args.rounds, inner)
        finally:
            lib.vz_mixer = real

    print(f"torch {torch.__version__}, 1 thread, L={L}, clock=process CPU time, min of {args.rounds} rounds")
    print(f"scan kernel (768 channels = one Vim-Ti layer)   {scan:8.3f} ms  ({scan * 1e6 / updates:.2f} ns per update)")
    print(f"conv kernel (both directions of one layer)      {conv_ms:8.3f} ms")
    print(f"mixer python + small ops (kernels no-op)        {total * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
