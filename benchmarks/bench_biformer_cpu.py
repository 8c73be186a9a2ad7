#!/usr/bin/env python
"""BiFormer on CPU: the ``reference`` BRA backend (the official algorithm) against ``auto`` (``chunked``).

    python benchmarks/bench_biformer_cpu.py                                # full table (time + memory)
    python benchmarks/bench_biformer_cpu.py --models biformer_tiny --sizes 224 --rounds 3
    python benchmarks/bench_biformer_cpu.py --op                          # BRA op alone, per stage shape
    python benchmarks/bench_biformer_cpu.py --op --device cuda --batch 64  # the same on a GPU

Whole models, batch ``--batch`` (4), fp32, ``torch.set_num_threads(--threads)``, eval mode:

* ``fwd``: forward under ``torch.inference_mode()``; ``fwd+bwd``: forward + ``out.sum().backward()``.
  Median over ``--rounds`` rounds; the two backends take turns inside every round so drift on a shared
  machine hits both alike.
* Sizes: 224 and 448 with the classification setting (``n_win=7``, as the official model runs at any
  multiple of 224), and 600x500 with the official ADE20K backbone setting (``n_win=8``, ``auto_pad``).
* Peak memory: each (model, size, backend, mode) runs once more in a fresh subprocess; reported is the
  peak resident set size (``ru_maxrss``) during one step minus the RSS just before it (model, input and
  one single-image warm-up forward already done). This is process memory as the OS sees it (glibc
  may keep freed blocks, so it is an upper bound of live tensor memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import timm  # noqa: E402
import visionzoo  # noqa: E402,F401

SIZES = {"224": ((224, 224), dict(n_win=7)), "448": ((448, 448), dict(n_win=7)),
         "600x500": ((600, 500), dict(n_win=8, auto_pad=True))}
BACKENDS = ("reference", "auto")


def _build(name: str, size: str, backend: str):
    (h, w), extra = SIZES[size]
    model = timm.create_model(name, attn_backend=backend, **extra).eval()
    return model, torch.randn(4, 3, h, w)


def _step(model, x, mode: str) -> None:
    if mode == "fwd":
        with torch.inference_mode():
            model(x)
    else:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_memory(name: str, size: str, backend: str, mode: str, batch: int) -> float:
    """Runs in a fresh interpreter: peak RSS growth (MiB) over one step."""
    model, x = _build(name, size, backend)
    x = x[:batch]
    _step(model, x[:1], "fwd")  # warm-up with one image (its smaller peak is overtaken below)
    if mode != "fwd":
        model.zero_grad(set_to_none=True)
    before = _rss_mib()
    _step(model, x, mode)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak - before


def _memory_subprocess(name, size, backend, mode, batch, threads) -> float:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({threads}); "
            f"from benchmarks.bench_biformer_cpu import measure_memory; "
            f"print(measure_memory({name!r}, {size!r}, {backend!r}, {mode!r}, {batch}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_models(args) -> list:
    rows = []
    for name in args.models:
        for size in args.sizes:
            models = {b: _build(name, size, b) for b in BACKENDS}
            for mode in args.modes:
                times = {b: [] for b in BACKENDS}
                for b in BACKENDS:  # warm-up
                    _step(models[b][0], models[b][1][:args.batch], mode)
                for _ in range(args.rounds):
                    for b in BACKENDS:
                        model, x = models[b]
                        t = time.perf_counter()
                        _step(model, x[:args.batch], mode)
                        times[b].append(time.perf_counter() - t)
                row = dict(model=name, size=size, mode=mode,
                           **{f"{b}_s": statistics.median(times[b]) for b in BACKENDS},
                           **{f"{b}_min_s": min(times[b]) for b in BACKENDS})
                if args.memory:
                    for b in BACKENDS:
                        row[f"{b}_mib"] = _memory_subprocess(name, size, b, mode, args.batch, args.threads)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del models
    return rows


def bench_op(args) -> None:
    from visionzoo.ops.routing_attention import bi_level_routing_attention as bra
    shapes = [  # (name, side, C, heads, n_win, topk): biformer_tiny's BRA stages
        ("224 s1", 56, 64, 2, 7, 1), ("224 s2", 28, 128, 4, 7, 4), ("224 s3", 14, 256, 8, 7, 16),
        ("448 s1", 112, 64, 2, 7, 1), ("448 s2", 56, 128, 4, 7, 4), ("448 s3", 28, 256, 8, 7, 16),
    ]
    for label, side, C, heads, n, k in shapes:
        q, kk, v = (torch.randn(args.batch, side, side, C, device=args.device) for _ in range(3))
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        res = {}
        for mode in ("fwd", "fwd+bwd"):
            times = {b: [] for b in BACKENDS}
            for _ in range(args.rounds + 1):
                for b in BACKENDS:
                    leaves = [t.clone().requires_grad_(mode != "fwd") for t in (q, kk, v)]
                    sync()
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.inference_mode():
                            bra(*leaves, heads, n, k, C ** -0.5, backend=b)
                    else:
                        bra(*leaves, heads, n, k, C ** -0.5, backend=b).sum().backward()
                    sync()
                    times[b].append(time.perf_counter() - t0)
            for b in BACKENDS:
                res[f"{mode} {b} ms"] = round(1e3 * statistics.median(times[b][1:]), 1)
        print(json.dumps(dict(shape=label, **res)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["biformer_tiny", "biformer_small"])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--op", action="store_true", help="benchmark the BRA op alone instead of the models")
    p.add_argument("--device", default="cpu", help="device for --op (e.g. cuda; the models always run on CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}", flush=True)
    if args.op:
        bench_op(args)
    else:
        bench_models(args)


if __name__ == "__main__":
    main()
