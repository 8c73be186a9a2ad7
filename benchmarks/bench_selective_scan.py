"""CPU timing of visionzoo.ops.selective_scan at the Vim-Tiny size.

Vim-Tiny calls the scan 24 times per forward with both directions stacked along the channels:
batch=1, dim=768 (2 x 384), L=197, N=16, grouped B/C (G=2), D, z and delta_bias given, softplus on.

    PYTHONPATH=. python benchmarks/bench_selective_scan.py --threads 1

Variants are interleaved round-robin and the minimum and median over rounds are printed, because
timings on a shared VM drift by tens of percent from one second to the next.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from visionzoo.ops.selective_scan import selective_scan


def make_inputs(batch, dim, length, dstate, groups, time_major=False, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        "A": -torch.exp(torch.randn(dim, dstate, generator=g) * 0.5 + 1.0),
        "B": torch.randn(batch, groups, dstate, length, generator=g),
        "C": torch.randn(batch, groups, dstate, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.1,
    }
    if time_major:  # (b, d, L) views of (b, L, d) memory, as produced by nn.Linear on (b, L, C) tokens
        for k in ("u", "delta", "z"):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    if requires_grad:
        x = {k: v.requires_grad_() for k, v in x.items()}
    return x


def forward(x, backend):
    def f():
        with torch.no_grad():
            selective_scan(**x, delta_softplus=True, backend=backend)
    return f


def forward_backward(x, backend):
    grad = torch.randn(x["u"].shape)

    def f():
        for v in x.values():
            v.grad = None
        selective_scan(**x, delta_softplus=True, backend=backend).backward(grad)
    return f


def bench(variants, rounds, inner):
    for f in variants.values():  # warm-up
        f()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--length", type=int, default=197)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.dim, args.length, args.dstate, args.groups)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"batch={shape[0]} dim={shape[1]} L={shape[2]} N={shape[3]} G={shape[4]}")

    fast = {
        "chunked fwd": forward(make_inputs(*shape), "chunked"),
        "chunked fwd (time-major u/delta/z)": forward(make_inputs(*shape, time_major=True), "chunked"),
        "chunked fwd+bwd": forward_backward(make_inputs(*shape, requires_grad=True), "chunked"),
    }
    results = bench(fast, args.rounds, inner=5)
    if not args.skip_reference:
        slow = {
            "reference fwd": forward(make_inputs(*shape), "reference"),
            "reference fwd+bwd": forward_backward(make_inputs(*shape, requires_grad=True), "reference"),
        }
        results.update(bench(slow, max(3, args.rounds // 6), inner=1))
    for name, (best, median) in results.items():
        print(f"{name:38s} min {best:8.2f} ms   median {median:8.2f} ms")


if __name__ == "__main__":
    main()
