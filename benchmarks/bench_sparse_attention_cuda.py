#!/usr/bin/env python
"""Sparse attention on a GPU: the ``triton`` kernels against ``masked``, ``gather`` and ``reference``.

    python benchmarks/bench_sparse_attention_cuda.py                  # < 60 s on one H200
    python benchmarks/bench_sparse_attention_cuda.py --json out.json --dtypes float32 bfloat16

DeiT-S attention shapes (6 heads, d = 64) at 224 (N = 197, K = 50 kept keys) and 384 (N = 577,
K = 145), batch 64, one dense class row, random kept sets (``K`` distinct keys per row). For every
(size, dtype): first a correctness check of ``triton`` against ``reference`` (output and the three
gradients; max abs error printed, fp32 must be < 1e-3), then forward and forward+backward times
(CUDA events, median of ``--reps`` after warm-up) per backend. Before that, a short sweep of Triton
block sizes (BLOCK_M, BLOCK_K, num_warps) at 384 fp32 picks the configuration used for the rest; the
sweep's times are printed too. The script stops adding work once ``--budget`` seconds have passed
and says what it skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from visionzoo.ops import is_available  # noqa: E402
from visionzoo.ops.sparse_attention import sparse_attention, triton_tiles  # noqa: E402
from visionzoo.ops.sparse_attention import TILE_CONFIGS as CONFIGS  # noqa: E402

SIZES = {224: (197, 50), 384: (577, 145), 0: (17, 5)}  # image size -> (tokens, kept keys); 0: a CPU smoke size


DEVICE = "cuda"


def inputs(batch, n, kept, dtype, grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, 6, n, 64, device=DEVICE, generator=g).to(dtype).requires_grad_(grad)
               for _ in range(3))
    idx = torch.rand(batch, 6, n - 1, n, device=DEVICE, generator=g).argsort(-1)[..., :kept].contiguous()
    return q, k, v, idx


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps):
    """Median ms over ``reps`` calls after two warm-up calls (3 calls when one takes over 0.2 s)."""
    fn()
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    if time.perf_counter() - t > 0.2:
        reps = min(reps, 3)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def step(q, k, v, idx, backend, backward):
    out = sparse_attention(q, k, v, idx, 0.125, backend=backend)
    if backward:
        out.backward(torch.ones_like(out))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384], choices=sorted(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--backends", nargs="+", default=["triton", "masked", "gather", "reference"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds after which no new work starts")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script in Triton's interpreter")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if not is_available("sparse_attention", "triton", DEVICE) or (DEVICE == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"backend 'triton' is not available on {DEVICE} (CUDA device + Triton, or TRITON_INTERPRET=1)")
    t0 = time.time()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"
    print(f"# {name}, torch {torch.__version__}, batch {args.batch}, 6 heads, d 64, "
          f"median of {args.reps}; times in ms", flush=True)
    results = {"sweep": [], "rows": [], "skipped": []}

    if not args.no_sweep:
        n, kept = SIZES[384]
        q, k, v, idx = inputs(args.batch, n, kept, torch.float32, True)
        best = None
        for bm, bk, warps in CONFIGS:
            if time.time() - t0 > args.budget / 2:
                results["skipped"].append(f"sweep BLOCK_M={bm} BLOCK_K={bk} warps={warps}")
                continue
            triton_tiles(bm, bk, warps)
            try:
                ms = timed(lambda: step(q, k, v, idx, "triton", True), 3)  # noqa: B023 - called here
            except Exception as e:  # noqa: BLE001 - report a config that fails to compile, keep going
                print(f"sweep BLOCK_M={bm} BLOCK_K={bk} warps={warps}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            print(f"sweep 384 fp32 fwd+bwd BLOCK_M={bm} BLOCK_K={bk} warps={warps}: {ms:.2f}", flush=True)
            results["sweep"].append(dict(block_m=bm, block_k=bk, warps=warps, fwd_bwd_ms=ms))
            if best is None or ms < best[0]:
                best = (ms, bm, bk, warps)
        if best is not None:
            triton_tiles(*best[1:])
        q = k = v = idx = None
    print("# triton config: BLOCK_M={} BLOCK_K={} warps={}".format(*triton_tiles()), flush=True)

    for size in args.sizes:
        n, kept = SIZES[size]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            if time.time() - t0 > args.budget:
                results["skipped"].append(f"{size} {dtype_name}")
                continue
            q, k, v, idx = inputs(args.batch, n, kept, dtype, True)
            out = step(q, k, v, idx, "triton", True)
            grads = [x.grad.clone() for x in (q, k, v)]
            for x in (q, k, v):
                x.grad = None
            ref = step(q, k, v, idx, "reference", True)
            errs = [(out - ref).abs().max().item()]
            errs += [(g - x.grad).abs().max().item() for g, x in zip(grads, (q, k, v))]
            for x in (q, k, v):
                x.grad = None
            row = dict(size=size, tokens=n, kept=kept, dtype=dtype_name, max_abs_err_out_dq_dk_dv=errs)
            print(f"{size} {dtype_name}: triton vs reference max abs error out {errs[0]:.2e} dq {errs[1]:.2e} "
                  f"dk {errs[2]:.2e} dv {errs[3]:.2e}", flush=True)
            if dtype == torch.float32 and max(errs) > 1e-3:
                print("  MISMATCH: triton disagrees with reference", flush=True)
            for backend in args.backends:
                if time.time() - t0 > args.budget:
                    results["skipped"].append(f"{size} {dtype_name} {backend}")
                    continue
                with torch.no_grad():
                    fwd = timed(lambda b=backend: step(q, k, v, idx, b, False), args.reps)
                fb = timed(lambda b=backend: step(q, k, v, idx, b, True), args.reps)
                for x in (q, k, v):
                    x.grad = None
                row[f"{backend}_fwd_ms"], row[f"{backend}_fwd_bwd_ms"] = fwd, fb
                print(f"{size} {dtype_name} {backend:9s} fwd {fwd:8.2f}  fwd+bwd {fb:8.2f}", flush=True)
            results["rows"].append(row)
            q = k = v = idx = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if results["skipped"]:
        print("skipped (time budget): " + ", ".join(results["skipped"]))
    print(f"# total {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
