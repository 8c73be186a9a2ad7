#!/usr/bin/env python
"""Vim CPU speed bars: vim_tiny forward at 224, batch 1, one thread, against
(a) the official code's only CPU path — its sequential reference scan, one scan per direction, in the
    official layer structure (tests/models/vim_official.py, an independent port), and
(b) timm's deit_tiny_patch16_224.

    OMP_NUM_THREADS=1 python benchmarks/bench_vim_cpu.py [--reps 10] [--out benchmarks/vim_cpu.md]

Median of --reps timed forwards after warm-up, torch.inference_mode, fp32.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visionzoo  # noqa: E402,F401
from tests.models.vim_official import official_vim_forward  # noqa: E402


def median_ms(fn, reps, warmup=2):
    """(median, best) of ``reps`` timed calls, in ms. On a shared machine the best is the steadier
    figure; both are reported."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--official-reps", type=int, default=3)
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)

    rows = []
    for name in ("vim_tiny", "vim_small"):
        model = timm.create_model(name).eval()
        official_sd = {("layers." + k[7:] if k.startswith("blocks.") else "norm_f." + k[5:] if k.startswith("norm.") else k): v
                       for k, v in model.state_dict().items()}
        ours = median_ms(lambda: model(x), args.reps)
        official = median_ms(lambda: official_vim_forward(official_sd, x), args.official_reps, warmup=1)
        rows.append((name, ours, official))
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    deit_ms = median_ms(lambda: deit(x), args.reps)

    lines = [
        "# Vim CPU speed (forward, 224x224, batch 1, fp32, one thread)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_vim_cpu.py --reps {args.reps}`",
        f"Machine: {platform.platform()}, torch {torch.__version__}, timm {timm.__version__}; "
        f"{args.reps} timed runs after 2 warm-up runs (official path: {args.official_reps} after 1).",
        "",
        "Times are median / best in ms; ratios use the best times (steadier on a shared machine).",
        "",
        "| model | visionzoo (auto backend) | official CPU path | speed-up vs official | time vs deit_tiny |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ours, official in rows:
        lines.append(f"| {name} | {ours[0]:.1f} / {ours[1]:.1f} | {official[0]:.0f} / {official[1]:.0f} | "
                     f"{official[1] / ours[1]:.1f}x | {ours[1] / deit_ms[1]:.2f}x |")
    lines.append(f"| deit_tiny_patch16_224 (timm) | {deit_ms[0]:.1f} / {deit_ms[1]:.1f} | | | 1.00x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
