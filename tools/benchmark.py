#!/usr/bin/env python
"""Table of models: parameters, GMACs and measured CPU inference throughput.

    python tools/benchmark.py                                   # every visionzoo model
    python tools/benchmark.py --models vim_tiny deit_tiny_patch16_224 --threads 1 --reps 20

Parameters and GMACs are counted on the meta device (custom ops included, see
visionzoo.utils.flops). Throughput is batch-``--batch-size`` eval forward on the CPU, median of
``--reps`` timed runs after ``--warmup`` untimed ones, for models up to ``--max-timed-params``.
``--csv`` appends the rows, with the command line and machine, to a file under benchmarks/.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzoo  # noqa: E402  (registers the models)
from visionzoo.utils import count_macs, count_params  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["*"],
                   help="model names or globs (visionzoo models; exact timm names also accepted)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-timed-params", type=float, default=30e6,
                   help="time only models with at most this many parameters")
    p.add_argument("--csv", type=str, default=None, help="append results to this CSV file")
    return p.parse_args(argv)


def resolve_models(patterns):
    zoo = visionzoo.list_models()
    names = []
    for pat in patterns:
        matched = [n for n in zoo if fnmatch.fnmatch(n, pat)]
        if not matched and pat in timm.list_models():
            matched = [pat]
        if not matched:
            raise SystemExit(f"benchmark: no model matches {pat!r}")
        names.extend(n for n in matched if n not in names)
    return names


def measure_throughput(name, img_size, batch_size, warmup, reps, device="cpu"):
    model = timm.create_model(name, img_size=img_size).eval().to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return median * 1e3, batch_size / median


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# torch {torch.__version__}, {args.device} ({hw}), {torch.get_num_threads()} CPU threads, "
          f"input {args.img_size}x{args.img_size}, batch {args.batch_size}")
    header = f"{'model':28s} {'params':>12s} {'GMACs':>7s} {'ms/iter':>9s} {'img/s':>8s}"
    print(header)
    print("-" * len(header))
    for name in resolve_models(args.models):
        with torch.device("meta"):
            meta_model = timm.create_model(name, img_size=args.img_size)
        params = count_params(meta_model)
        gmacs = count_macs(meta_model, (1, 3, args.img_size, args.img_size)) / 1e9
        ms = ips = None
        if params <= args.max_timed_params:
            ms, ips = measure_throughput(name, args.img_size, args.batch_size, args.warmup, args.reps, args.device)
        rows.append(dict(model=name, params=params, gmacs=round(gmacs, 3), img_size=args.img_size, device=args.device,
                         batch_size=args.batch_size, threads=torch.get_num_threads(),
                         ms_per_iter=None if ms is None else round(ms, 2),
                         img_per_s=None if ips is None else round(ips, 2)))
        timing = f"{ms:9.1f} {ips:8.2f}" if ms is not None else f"{'-':>9s} {'-':>8s}"
        print(f"{name:28s} {params:12,d} {gmacs:7.3f} {timing}", flush=True)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            if new:
                f.write(f"# command: python tools/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
                f.write(f"# torch {torch.__version__}, timm {timm.__version__}, {platform.platform()}, "
                        f"cpu {platform.processor() or platform.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n")
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
