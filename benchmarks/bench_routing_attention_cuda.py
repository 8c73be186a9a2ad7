#!/usr/bin/env python
"""BRA on a GPU: the fused ``triton`` kernel against ``chunked`` and the official gather (``reference``).

    python benchmarks/bench_routing_attention_cuda.py                 # tiny's BRA stages at 224, batch 64
    python benchmarks/bench_routing_attention_cuda.py --batch 64 --reps 20 --dtype float16

For each of biformer_tiny's three BRA stage shapes at 224 (56x56 C 64 2 heads topk 1; 28x28 C 128
4 heads topk 4; 14x14 C 256 8 heads topk 16; n_win 7, scale C ** -0.5), with q/k/v the channel slices
of one ``(B, H, W, 3C)`` tensor as in the model:

* parity first: max |triton - reference| of the output and of the qkv gradient (same routing);
* ``fwd`` (no grad) and ``fwd+bwd`` (``(out * w).sum().backward()``) times: median over ``--reps``
  after ``--warmup`` runs, CUDA events; backends interleaved round-robin;
* peak memory above the inputs (``torch.cuda.max_memory_allocated``) in ``fwd+bwd``.

The issue's GPU bar: triton >= 2x faster than the gather reference in fwd+bwd at 224, batch 64.
Takes well under a minute on an H200 (most of it Triton compiling 3 kernels x 2 tile configs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionzoo.ops.routing_attention import bi_level_routing_attention as bra  # noqa: E402

SHAPES = [("224 s1", 56, 64, 2, 1), ("224 s2", 28, 128, 4, 4), ("224 s3", 14, 256, 8, 16)]
BACKENDS = ("reference", "chunked", "triton")


def _step(qkv, C, heads, topk, backend, w, grad: bool):
    if not grad:
        with torch.no_grad():
            return bra(*qkv.split(C, dim=-1), heads, 7, topk, C ** -0.5, backend=backend)
    leaf = qkv.detach().requires_grad_(True)
    out = bra(*leaf.split(C, dim=-1), heads, 7, topk, C ** -0.5, backend=backend)
    (out.float() * w).sum().backward()
    return out, leaf.grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, {args.dtype}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    rows = []
    for label, side, C, heads, topk in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(args.batch, side, side, 3 * C, device=dev, generator=g).to(dtype)
        w = torch.randn(args.batch, side, side, C, device=dev, generator=g)
        # Parity (the routing is shared: same inputs, same route function).
        ref_out, ref_grad = _step(qkv, C, heads, topk, "reference", w, True)
        tri_out, tri_grad = _step(qkv, C, heads, topk, "triton", w, True)
        err_out = (tri_out.float() - ref_out.float()).abs().max().item()
        err_grad = (tri_grad.float() - ref_grad.float()).abs().max().item()
        del ref_out, ref_grad, tri_out, tri_grad
        res = {}
        for mode in ("fwd", "fwd+bwd"):
            grad = mode != "fwd"
            times = {b: [] for b in BACKENDS}
            for _ in range(args.warmup):
                for b in BACKENDS:
                    _step(qkv, C, heads, topk, b, w, grad)
            for _ in range(args.reps):
                for b in BACKENDS:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    _step(qkv, C, heads, topk, b, w, grad)
                    end.record()
                    end.synchronize()
                    times[b].append(start.elapsed_time(end))
            for b in BACKENDS:
                res[(mode, b)] = statistics.median(times[b])
        mem = {}
        for b in BACKENDS:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(qkv, C, heads, topk, b, w, True)
            torch.cuda.synchronize()
            mem[b] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        rows.append((label, res, mem, err_out, err_grad))
        print(f"{label}: done", flush=True)

    print()
    print("| shape | mode | reference ms | chunked ms | triton ms | triton vs reference | triton vs chunked |")
    print("|---|---|---|---|---|---|---|")
    for label, res, _, _, _ in rows:
        for mode in ("fwd", "fwd+bwd"):
            r, c, t = (res[(mode, b)] for b in BACKENDS)
            print(f"| {label} | {mode} | {r:.3f} | {c:.3f} | {t:.3f} | {r / t:.2f}x | {c / t:.2f}x |")
    tot = {(m, b): sum(res[(m, b)] for _, res, _, _, _ in rows) for m in ("fwd", "fwd+bwd") for b in BACKENDS}
    for mode in ("fwd", "fwd+bwd"):
        r, c, t = (tot[(mode, b)] for b in BACKENDS)
        print(f"| sum of stages | {mode} | {r:.3f} | {c:.3f} | {t:.3f} | {r / t:.2f}x | {c / t:.2f}x |")
    print()
    print("| shape | fwd+bwd peak MiB reference / chunked / triton | max abs err out / grad (triton vs reference) |")
    print("|---|---|---|")
    for label, _, mem, e_out, e_grad in rows:
        print(f"| {label} | {mem['reference']:.0f} / {mem['chunked']:.0f} / {mem['triton']:.0f} | "
              f"{e_out:.2e} / {e_grad:.2e} |")
    r, t = tot[("fwd+bwd", "reference")], tot[("fwd+bwd", "triton")]
    print(f"\nbar (triton >= 2x reference in fwd+bwd, summed over the stages): {r / t:.2f}x -> "
          f"{'met' if r / t >= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
