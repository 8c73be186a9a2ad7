#!/usr/bin/env python
"""BiFormer on CPU: the official forward and the ``reference`` BRA backend against ``auto`` (``chunked``).

    python benchmarks/bench_biformer_cpu.py                                # full table (time + memory)
    python benchmarks/bench_biformer_cpu.py --models biformer_tiny --sizes 224 --rounds 3
    python benchmarks/bench_biformer_cpu.py --memory-only --sizes 600x500 --modes fwd
    python benchmarks/bench_biformer_cpu.py --op                          # BRA op alone, per stage shape
    python benchmarks/bench_biformer_cpu.py --op --device cuda --batch 64  # the same on a GPU

Whole models, batch ``--batch`` (4), fp32, ``torch.set_num_threads(--threads)``, eval mode:

* Variants: ``official`` is the functional port of the official forward in
  ``tests/models/biformer_official.py`` (official BRA ``bra_legacy``: region layout, ``torch.gather``
  on an expanded view, explicit matmul/softmax; run on the model's own weights); ``reference`` is the
  visionzoo model with the official BRA algorithm as its backend; ``auto`` is the visionzoo model as
  shipped. ``official`` is forward-only (it is a functional port, no training path).
* ``fwd``: forward under ``torch.inference_mode()``; ``fwd+bwd``: forward + ``out.sum().backward()``.
  Median and minimum over ``--rounds`` rounds; the variants take turns inside every round (round-robin)
  so drift on a shared machine hits them alike; also each round's time ratio against ``auto`` (its two
  runs are adjacent in time) and the median of those ratios, the estimate least hurt by load drift.
* Sizes: 224 and 448 with the classification setting (``n_win=7``, as the official model runs at any
  multiple of 224), and 600x500 with the official ADE20K backbone setting (``n_win=8``, ``auto_pad``).
* Peak memory: each (model, size, variant, mode) runs once more in a fresh subprocess, after building
  the model and a one-image warm-up:
  - ``live``: peak bytes of tensors created during one step (:class:`visionzoo.utils.memory.PeakLiveBytes`;
    what the dispatched ops allocate, not temporaries private to a kernel or inside a custom op);
  - ``rss``: peak resident set growth over that step (``ru_maxrss`` minus the RSS before it) with
    ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment, so that glibc returns freed blocks at once and
    the RSS follows what is allocated, kernel-private buffers included.
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
VARIANTS = ("official", "reference", "auto")
ARCH = {"biformer_tiny": dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512)),
        "biformer_small": dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512))}


class _Official:
    """The official forward (functional port) on a visionzoo model's weights, in official layout."""

    def __init__(self, model, name: str, size: str):
        from tests.models.biformer_official import official_biformer_forward
        from tests.models.test_biformer import _to_official

        extra = SIZES[size][1]
        self.sd = _to_official(model.state_dict())
        self.fn = official_biformer_forward
        self.kw = dict(ARCH[name], n_win=extra["n_win"], auto_pad=extra.get("auto_pad", False))

    def __call__(self, x):
        return self.fn(self.sd, x, **self.kw)


def _build(name: str, size: str, variant: str):
    (h, w), extra = SIZES[size]
    backend = "reference" if variant == "official" else variant
    model = timm.create_model(name, attn_backend=backend, **extra).eval()
    if variant == "official":
        model = _Official(model, name, size)
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


def measure_memory(name: str, size: str, variant: str, mode: str, batch: int) -> dict:
    """Runs in a fresh interpreter: peak live tensor MiB and peak RSS growth (MiB) over one step."""
    from visionzoo.utils.memory import PeakLiveBytes

    model, x = _build(name, size, variant)
    x = x[:batch]
    _step(model, x[:1], "fwd")  # warm-up with one image (its smaller peak is overtaken below)
    if mode != "fwd":
        model.zero_grad(set_to_none=True)
    before = _rss_mib()
    _step(model, x, mode)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    if mode != "fwd":
        model.zero_grad(set_to_none=True)
    with PeakLiveBytes() as tracker:
        _step(model, x, mode)
    return dict(live=round(tracker.peak / 2 ** 20, 1), rss=round(rss, 1))


def _memory_subprocess(name, size, variant, mode, batch, threads) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({threads}); "
            f"from benchmarks.bench_biformer_cpu import measure_memory; "
            f"print(repr(measure_memory({name!r}, {size!r}, {variant!r}, {mode!r}, {batch})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return eval(out.stdout.strip().splitlines()[-1])  # a dict literal printed by the child


def bench_models(args) -> list:
    rows = []
    for name in args.models:
        for size in args.sizes:
            for mode in args.modes:
                variants = [v for v in args.variants if not (v == "official" and mode != "fwd")]
                row = dict(model=name, size=size, mode=mode)
                if not args.memory_only:
                    models = {v: _build(name, size, v) for v in variants}
                    times = {v: [] for v in variants}
                    for v in variants:  # warm-up
                        _step(models[v][0], models[v][1][:args.batch], mode)
                    for _ in range(args.rounds):
                        for v in variants:
                            model, x = models[v]
                            t = time.perf_counter()
                            _step(model, x[:args.batch], mode)
                            times[v].append(time.perf_counter() - t)
                    del models
                    row.update({f"{v}_s": round(statistics.median(times[v]), 3) for v in variants})
                    row.update({f"{v}_min_s": round(min(times[v]), 3) for v in variants})
                    if "auto" in variants:  # per-round ratios: the two runs of a round are adjacent in time
                        for v in variants:
                            if v != "auto":
                                r = [a / b for a, b in zip(times[v], times["auto"])]
                                row[f"{v}/auto_round_ratios"] = [round(x, 2) for x in r]
                                row[f"{v}/auto_median_ratio"] = round(statistics.median(r), 2)
                if args.memory or args.memory_only:
                    for v in variants:
                        mem = _memory_subprocess(name, size, v, mode, args.batch, args.threads)
                        row.update({f"{v}_{k}_mib": val for k, val in mem.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


OP_BACKENDS = ("reference", "auto")


def bench_op(args) -> None:
    from visionzoo.ops.routing_attention import bi_level_routing_attention as bra
    shapes = [  # (name, side, C, heads, n_win, topk): biformer_tiny's BRA stages
        ("224 s1", 56, 64, 2, 7, 1), ("224 s2", 28, 128, 4, 7, 4), ("224 s3", 14, 256, 8, 7, 16),
        ("448 s1", 112, 64, 2, 7, 1), ("448 s2", 56, 128, 4, 7, 4), ("448 s3", 28, 256, 8, 7, 16),
    ]
    for label, side, C, heads, n, k in shapes:
        qkv = torch.randn(args.batch, side, side, 3 * C, device=args.device)  # as the model: one projection
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        res = {}
        for mode in ("fwd", "fwd+bwd"):
            times = {b: [] for b in OP_BACKENDS}
            for _ in range(args.rounds + 1):
                for b in OP_BACKENDS:
                    leaves = qkv.clone().requires_grad_(mode != "fwd").split(C, dim=-1)
                    sync()
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.inference_mode():
                            bra(*leaves, heads, n, k, C ** -0.5, backend=b)
                    else:
                        bra(*leaves, heads, n, k, C ** -0.5, backend=b).sum().backward()
                    sync()
                    times[b].append(time.perf_counter() - t0)
            for b in OP_BACKENDS:
                res[f"{mode} {b} ms"] = round(1e3 * statistics.median(times[b][1:]), 1)
        print(json.dumps(dict(shape=label, **res)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["biformer_tiny", "biformer_small"])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", action="store_true", help="skip the timing, measure memory only")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
