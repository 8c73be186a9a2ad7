#!/usr/bin/env python
"""BRA on a GPU: the fused ``triton`` kernel and ``flex`` (FlexAttention) against ``chunked`` and the
official gather (``reference``).

    python benchmarks/bench_routing_attention_cuda.py                 # tiny's BRA stages at 224, batch 64
    python benchmarks/bench_routing_attention_cuda.py --batch 64 --reps 20 --dtype float16
    TRITON_INTERPRET=1 python benchmarks/bench_routing_attention_cuda.py --smoke   # CPU check of the script

For each of biformer_tiny's three BRA stage shapes at 224 (56x56 C 64 2 heads topk 1; 28x28 C 128
4 heads topk 4; 14x14 C 256 8 heads topk 16; n_win 7, scale C ** -0.5), with q/k/v the channel slices
of one ``(B, H, W, 3C)`` tensor as in the model:

* parity first: max |backend - reference| of the output and of the qkv gradient (same routing);
* ``fwd`` (no grad) and ``fwd+bwd`` (``(out * w).sum().backward()``) times: median over ``--reps``
  after ``--warmup`` runs; backends interleaved round-robin;
* peak memory above the inputs (``torch.cuda.max_memory_allocated``) in ``fwd+bwd``.

The issue's GPU bar: triton >= 2x faster than the gather reference in fwd+bwd at 224, batch 64.
Backends that cannot run here are left out (``flex`` on CPU: no CPU backward). ``--smoke``: CPU, batch 1,
a 14x14 map with 16 channels, one repetition (Triton in its interpreter). Takes well under a minute on an H200 (most
of it compiling: Triton's 3 kernels x 2 tile configs, FlexAttention's forward and backward per shape).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionzoo.ops import why_not  # noqa: E402
from visionzoo.ops.routing_attention import bi_level_routing_attention as bra  # noqa: E402

SHAPES = [("224 s1", 56, 64, 2, 1), ("224 s2", 28, 128, 4, 4), ("224 s3", 14, 256, 8, 16)]
CANDIDATES = ("reference", "chunked", "flex", "triton")


def _step(qkv, C, heads, topk, backend, w, grad: bool):
    if not grad:
        with torch.no_grad():
            return bra(*qkv.split(C, dim=-1), heads, 7, topk, C ** -0.5, backend=backend)
    leaf = qkv.detach().requires_grad_(True)
    out = bra(*leaf.split(C, dim=-1), heads, 7, topk, C ** -0.5, backend=backend)
    (out.float() * w).sum().backward()
    return out, leaf.grad


def _timed(fn, dev: str) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


def _backends(dev: str, dtype) -> list:
    """The candidates that can run forward and backward here."""
    x = torch.empty(1, device=dev, dtype=dtype, requires_grad=True)
    return [b for b in CANDIDATES if why_not("routing_attention", b, x) is None]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: batch 1, a 14x14 C 16 map, one rep")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES
    if args.smoke:
        dev, shapes, args.batch, args.reps, args.warmup = "cpu", [("smoke 14x14 C 16", 14, 16, 2, 4)], 1, 1, 0
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        sys.exit("bench_routing_attention_cuda: needs a CUDA device (or --smoke)")
    backends = _backends(dev, dtype)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke test)"
    print(f"# {name}, torch {torch.__version__}, batch {args.batch}, {args.dtype}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, backends {', '.join(backends)}", flush=True)
    rows = []
    for label, side, C, heads, topk in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(args.batch, side, side, 3 * C, device=dev, generator=g).to(dtype)
        w = torch.randn(args.batch, side, side, C, device=dev, generator=g)
        # Parity (the routing is shared: same inputs, same route function).
        ref_out, ref_grad = _step(qkv, C, heads, topk, "reference", w, True)
        errs = {}
        for b in backends[1:]:
            out, grad = _step(qkv, C, heads, topk, b, w, True)
            errs[b] = ((out.float() - ref_out.float()).abs().max().item(),
                       (grad.float() - ref_grad.float()).abs().max().item())
            del out, grad
        del ref_out, ref_grad
        res = {}
        for mode in ("fwd", "fwd+bwd"):
            grad = mode != "fwd"
            times = {b: [] for b in backends}
            for _ in range(args.warmup):
                for b in backends:
                    _step(qkv, C, heads, topk, b, w, grad)
            for _ in range(args.reps):
                for b in backends:
                    times[b].append(_timed(lambda: _step(qkv, C, heads, topk, b, w, grad), dev))  # noqa: B023
            for b in backends:
                res[(mode, b)] = statistics.median(times[b])
        mem = {}
        for b in backends:
            if dev != "cuda":
                mem[b] = float("nan")
                continue
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(qkv, C, heads, topk, b, w, True)
            torch.cuda.synchronize()
            mem[b] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        rows.append((label, res, mem, errs))
        print(f"{label}: done", flush=True)

    print()
    print("| shape | mode | " + " | ".join(f"{b} ms" for b in backends) + " | "
          + " | ".join(f"{b} vs reference" for b in backends[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(backends) - 1))
    tot = {(m, b): sum(res[(m, b)] for _, res, _, _ in rows) for m in ("fwd", "fwd+bwd") for b in backends}
    for label, res, _, _ in rows + [("sum of stages", tot, None, None)]:
        for mode in ("fwd", "fwd+bwd"):
            ms = [res[(mode, b)] for b in backends]
            print(f"| {label} | {mode} | " + " | ".join(f"{t:.3f}" for t in ms) + " | "
                  + " | ".join(f"{ms[0] / t:.2f}x" for t in ms[1:]) + " |")
    print()
    print("| shape | fwd+bwd peak MiB " + " / ".join(backends) + " | max abs err out / grad vs reference |")
    print("|---|---|---|")
    for label, _, mem, errs in rows:
        print(f"| {label} | " + " / ".join(f"{mem[b]:.0f}" for b in backends) + " | "
              + "; ".join(f"{b} {e[0]:.2e} / {e[1]:.2e}" for b, e in errs.items()) + " |")
    r = tot[("fwd+bwd", "reference")]
    for b in backends[1:]:
        print(f"{b}: {r / tot[('fwd+bwd', b)]:.2f}x reference in fwd+bwd, summed over the stages"
              + (f" (bar for triton: >= 2x -> {'met' if r / tot[('fwd+bwd', b)] >= 2 else 'NOT met'})"
                 if b == "triton" else ""))


if __name__ == "__main__":
    main()
