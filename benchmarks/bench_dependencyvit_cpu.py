#!/usr/bin/env python
"""DependencyViT bars on a CPU: Lite's MACs and speed against Tiny, and the memory of the
memory-efficient reversed attention against the dense one.

    python benchmarks/bench_dependencyvit_cpu.py                       # everything, 2 threads
    python benchmarks/bench_dependencyvit_cpu.py --rounds 3 --reps 3 --skip-rss

1. GMACs at 224x224 (``visionzoo.utils.count_macs``: torch FlopCounter / 2, meta device).
2. Speed: ``dependencyvit_tiny`` vs ``dependencyvit_lite_tiny``, batch ``--batch-size`` (8), 224x224,
   fp32, eval, ``torch.inference_mode()``, ``torch.set_num_threads(--threads)``; median over
   ``--rounds`` rounds of ``--reps`` timed forwards after warm-up. The two models take turns inside
   every round so drift on a shared machine hits both alike. ``--train`` also times a training step
   (forward + backward, batch 8).
3. Memory: one Tiny block (D=192, 12 heads) on 1024 tokens (a 32x32 grid), batch ``--mem-batch``,
   forward + backward, ``attn_backend='reference'`` (dense) vs ``'chunked'``. Peak = the largest total
   size of tensor storages alive at once among those created by ops during the step (a
   ``TorchDispatchMode`` that adds each new storage's bytes and subtracts them when the storage is
   freed; inputs and parameters excluded). Cross-check (unless ``--skip-rss``): the increase of the
   process's peak RSS (``VmHWM``, reset right before the step) over its RSS then, each backend in a
   fresh subprocess (Linux).
4. The op alone: reversed attention forward + backward, reference vs chunked, at N=196 (batch 8) and
   N=1024 (batch 1), 12 heads of 16 channels.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzoo  # noqa: E402,F401  (registers the models)
from visionzoo.models.dependencyvit import DependencyViTBlock  # noqa: E402
from visionzoo.ops.reversed_attention import reversed_attention  # noqa: E402
from visionzoo.utils import count_macs  # noqa: E402
from visionzoo.utils.memory import PeakLiveBytes  # noqa: E402


def block_step_inputs(batch: int, backend: str):
    torch.manual_seed(0)
    block = DependencyViTBlock(192, 12, attn_backend=backend)
    x = torch.randn(batch, 1024, 192, requires_grad=True)
    m = torch.rand(batch, 1024)
    return block, x, m


def block_step(block, x, m):
    out, m_out, _ = block(x, m)
    (out.square().mean() + m_out.mean()).backward()


def block_peak_bytes(batch: int, backend: str) -> int:
    block, x, m = block_step_inputs(batch, backend)
    block_step(block, x, m)  # warm-up (lazy inits)
    block.zero_grad(set_to_none=True)
    x.grad = None
    with PeakLiveBytes() as tracker:
        block_step(block, x, m)
    return tracker.peak


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])


def rss_child(batch: int, backend: str) -> None:
    """Print the peak-RSS increase (bytes) of one block step, measured in this (fresh) process.

    Linux only: writing "5" to /proc/self/clear_refs resets the high-water mark VmHWM to the current
    RSS, so imports and set-up do not mask the step's peak.
    """
    block, x, m = block_step_inputs(batch, backend)
    block(x[:, :16].detach(), m[:, :16])  # touch the code paths at a tiny size
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _vm_kib("VmRSS:")
    block_step(block, x, m)
    print(json.dumps({"delta_bytes": (_vm_kib("VmHWM:") - base) * 1024}))


def rss_delta(batch: int, backend: str, threads: int) -> int:
    cmd = [sys.executable, __file__, "--rss-child", backend, "--mem-batch", str(batch), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["delta_bytes"]


def time_models(names, batch, rounds, reps, warmup, train=False):
    models = {n: timm.create_model(n).train(train) for n in names}
    x = torch.randn(batch, 3, 224, 224)
    times = {n: [] for n in names}

    def step(model):
        if train:
            model(x).mean().backward()
        else:
            with torch.inference_mode():
                model(x)

    for model in models.values():
        for _ in range(warmup):
            step(model)
    for _ in range(rounds):
        for n, model in models.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                step(model)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()}


def time_op(B, N, backend, reps):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 12, N, 16, requires_grad=True) for _ in range(3))
    p = torch.randn(B, 12, N).softmax(dim=1).requires_grad_()
    m = torch.rand(B, N, requires_grad=True)
    ts = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        reversed_attention(q, k, v, p, m, backend=backend).sum().backward()
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--train", action="store_true", help="also time a training step")
    ap.add_argument("--mem-batch", type=int, default=1)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--op-reps", type=int, default=7)
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.mem_batch, args.rss_child)
        return

    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads")
    names = ["dependencyvit_tiny", "dependencyvit_lite_tiny"]
    macs = {n: count_macs(n) / 1e9 for n in names}
    print("\n## GMACs @224")
    for n in names:
        print(f"{n}: {macs[n]:.3f}")
    print(f"lite / tiny = {macs[names[1]] / macs[names[0]]:.3f} ({100 * (1 - macs[names[1]] / macs[names[0]]):.1f}% fewer)")

    modes = [False, True] if args.train else [False]
    for train in modes:
        med, best = time_models(names, args.batch_size, args.rounds, args.reps, args.warmup, train)
        kind = "train step (fwd+bwd)" if train else "inference"
        print(f"\n## {kind}, batch {args.batch_size}, 224x224 "
              f"(median of {args.rounds}x{args.reps}, min in brackets)")
        for n in names:
            print(f"{n}: {1e3 * med[n]:.1f} ms ({1e3 * best[n]:.1f}) = {args.batch_size / med[n]:.1f} img/s")
        print(f"speed-up lite vs tiny: {med[names[0]] / med[names[1]]:.2f}x (min: {best[names[0]] / best[names[1]]:.2f}x)")

    print(f"\n## one Tiny block, 1024 tokens, batch {args.mem_batch}, forward + backward")
    peaks = {b: block_peak_bytes(args.mem_batch, b) for b in ("reference", "chunked")}
    for b, v in peaks.items():
        print(f"{b}: peak live tensors {v / 2**20:.1f} MiB")
    print(f"chunked / dense = {peaks['chunked'] / peaks['reference']:.3f}")
    if not args.skip_rss:
        rss = {b: rss_delta(args.mem_batch, b, args.threads) for b in ("reference", "chunked")}
        for b, v in rss.items():
            print(f"{b}: peak RSS increase {v / 2**20:.1f} MiB")
        print(f"chunked / dense (RSS) = {rss['chunked'] / rss['reference']:.3f}")

    print(f"\n## reversed attention op, 12 heads x 16, forward + backward (median of {args.op_reps})")
    for B, N in ((8, 196), (1, 1024)):
        t = {b: time_op(B, N, b, args.op_reps) for b in ("reference", "chunked")}
        print(f"B={B} N={N}: reference {1e3 * t['reference']:.1f} ms, chunked {1e3 * t['chunked']:.1f} ms")


if __name__ == "__main__":
    main()
