#!/usr/bin/env python
"""Vim CPU speed bars: vim_tiny forward at 224, batch 1, one thread, against
(a) the official code's only CPU path — its sequential reference scan, one scan per direction, in the
    official layer structure (tests/models/vim_official.py, an independent port), and
(b) timm's deit_tiny_patch16_224.

    OMP_NUM_THREADS=1 python benchmarks/bench_vim_cpu.py [--reps 10] [--out benchmarks/vim_cpu.md]

Round-robin over the models, --reps rounds, process CPU time, torch.inference_mode, fp32.
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


def interleaved_ms(fns, rounds, warmup=2, skip_after=None):
    """{name: (median, best)} in ms of ``rounds`` calls of each function, taken round-robin so that every
    model sees the same machine load, timed with process CPU time (with one thread it is the wall time a
    quiet machine would show; on this shared VM it is far steadier). ``skip_after`` limits slow entries
    to that many rounds."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for r in range(rounds):
            for name, f in fns.items():
                if skip_after and name in skip_after and r >= skip_after[name]:
                    continue
                t0 = time.process_time()
                f()
                times[name].append(time.process_time() - t0)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--official-reps", type=int, default=3)
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)

    fns, official = {}, {}
    for name in ("vim_tiny", "vim_small"):
        model = timm.create_model(name).eval()
        official_sd = {("layers." + k[7:] if k.startswith("blocks.") else "norm_f." + k[5:] if k.startswith("norm.") else k): v
                       for k, v in model.state_dict().items()}
        fns[name] = (lambda m: lambda: m(x))(model)
        official[name] = f"{name} official"
        fns[official[name]] = (lambda sd: lambda: official_vim_forward(sd, x))(official_sd)
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    fns["deit"] = lambda: deit(x)
    res = interleaved_ms(fns, args.reps, skip_after={v: args.official_reps for v in official.values()})
    rows = [(name, res[name], res[official[name]]) for name in ("vim_tiny", "vim_small")]
    deit_ms = res["deit"]

    lines = [
        "# Vim CPU speed (forward, 224x224, batch 1, fp32, one thread)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_vim_cpu.py --reps {args.reps}`",
        f"Machine: {platform.platform()}, torch {torch.__version__}, timm {timm.__version__}; "
        f"{args.reps} rounds after 2 warm-up rounds (official path: the first {args.official_reps} rounds); "
        "every round runs each model once (round-robin), timed with process CPU time.",
        "",
        "Times are median / best in ms; ratios use the best times (steadier on a shared machine), and the",
        "medians' ratio for vim_tiny vs DeiT-Ti is given below the table.",
        "",
        "| model | visionzoo (auto backend) | official CPU path | speed-up vs official | time vs deit_tiny |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ours, official in rows:
        lines.append(f"| {name} | {ours[0]:.1f} / {ours[1]:.1f} | {official[0]:.0f} / {official[1]:.0f} | "
                     f"{official[1] / ours[1]:.1f}x | {ours[1] / deit_ms[1]:.2f}x |")
    lines.append(f"| deit_tiny_patch16_224 (timm) | {deit_ms[0]:.1f} / {deit_ms[1]:.1f} | | | 1.00x |")
    lines += ["", f"vim_tiny / DeiT-Ti on medians: {rows[0][1][0] / deit_ms[0]:.2f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
