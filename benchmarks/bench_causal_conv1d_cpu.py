#!/usr/bin/env python
"""Depthwise causal conv1d (K=4, SiLU) at Vim-Tiny's size (batch 1, 768 channels, L=197), one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_causal_conv1d_cpu.py

Compares the `reference` backend (F.conv1d), the `shifted` backend and the `cpu` C kernel on a contiguous (B, C, L)
input and on a time-major one (a (B, C, L) view of (B, L, C) memory, as nn.Linear produces it).
Best of 200 calls after warm-up, in microseconds.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionzoo.ops.causal_conv1d import causal_conv1d  # noqa: E402


def best_us(fn, n=200):
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e6


def main():
    torch.set_num_threads(1)
    w, b = torch.randn(768, 4), torch.randn(768)
    inputs = {"contiguous (B, C, L)": torch.randn(1, 768, 197),
              "time-major view": torch.randn(1, 197, 768).transpose(1, 2)}
    print("| input | reference (F.conv1d) us | shifted us | cpu (C kernel) us |")
    print("|---|---:|---:|---:|")
    with torch.inference_mode():
        for label, x in inputs.items():
            ref = best_us(lambda: causal_conv1d(x, w, b, "silu", backend="reference"))
            sh = best_us(lambda: causal_conv1d(x, w, b, "silu", backend="shifted"))
            c = best_us(lambda: causal_conv1d(x, w, b, "silu", backend="cpu"))
            print(f"| {label} | {ref:.0f} | {sh:.0f} | {c:.0f} |")


if __name__ == "__main__":
    main()
