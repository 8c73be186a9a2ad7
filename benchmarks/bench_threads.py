#!/usr/bin/env python
"""Thread sweep on the CPU: models x image sizes x modes x dtypes x thread counts, round-robin.

    python benchmarks/bench_threads.py [--models vim_tiny deit_tiny_patch16_224] [--sizes 224 512 1024]
        [--modes infer train] [--dtypes fp32 bf16] [--threads 1 2] [--rounds 3] [--reps 3]
        [--train-batch 8]

Every measurement is a fresh process (``--worker``) that builds one model with random weights, sets
``torch.set_num_threads``, warms up once and reports the median wall time of ``--reps`` calls: inference
(batch 1, ``inference_mode``) or a training step (``--train-batch``, forward + cross-entropy + backward +
SGD step). ``bf16`` is ``torch.autocast("cpu", torch.bfloat16)`` around the forward. Every round runs every
cell once, in the same order, so all cells see the same machine load; the table gives the median over
rounds per cell (ms), the speed-up of each thread count over the first, and the ratio of each model to
the last model listed (at the same size, mode, dtype and threads). A cell that fails (out of memory, a
missing model) prints its error and stays empty.

    python benchmarks/bench_threads.py --kernels [--sizes 224 1024] [--threads 1 2] [--reps 200]

``--kernels`` times the Vim-Ti layer's C work instead, in one process, the thread counts alternating call
by call: the fused inference mixer (``bimamba_inner_cpu``: both convs, both x-projections, both scans) at
batch 1, and the bidirectional scan's forward + backward (the training path) at batch 1 and
``--train-batch``, at the token counts of ``--sizes``; the minimum wall time over ``--reps`` calls (the
least disturbed by other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import timm

    import visionzoo  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    size = args.size
    model = timm.create_model(args.model, img_size=size, num_classes=1000)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.mode == "infer":
        model.eval()
        x = torch.randn(1, 3, size, size)

        def step():
            with torch.inference_mode(), autocast:
                model(x)
    else:
        model.train()
        x = torch.randn(args.train_batch, 3, size, size)
        y = torch.randint(0, 1000, (args.train_batch,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    step()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": statistics.median(times) * 1e3}))


def kernels(args) -> None:
    import torch
    import timm

    import visionzoo  # noqa: F401
    from visionzoo.ops.selective_scan import MixerDirection, _cpu, _cpu_bwd, bimamba_inner_cpu

    mixer = timm.create_model("vim_tiny").eval().blocks[0].mixer
    dirs = tuple(MixerDirection(c.weight, c.bias, xp.weight, dp.weight, dp.bias, a, d) for c, xp, dp, a, d in (
        (mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D),
        (mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)))
    E, N = mixer.A_log.shape
    g = torch.Generator().manual_seed(0)
    print(f"min wall time over {args.reps} calls per thread count, alternating; ms; speed-up vs "
          f"{args.threads[0]} thread(s)\n")
    print("| work | L | batch | " + " | ".join(f"{n} thr" for n in args.threads) + " | speed-up |")
    print("|---|---:|---:|" + "---:|" * (len(args.threads) + 1))
    for size in args.sizes:
        L = (size // 16) ** 2 + 1
        xz = torch.randn(1, L, 2 * E, generator=g)
        buf = torch.empty_like(xz)

        def fused():
            buf.copy_(xz)
            bimamba_inner_cpu(buf, *dirs)

        cases = [("fused mixer (inference)", 1, fused)]
        for batch in (1, args.train_batch):
            u, delta = (torch.randn(batch, L, 2 * E, generator=g).transpose(1, 2) for _ in range(2))
            z = torch.randn(batch, L, E, generator=g).transpose(1, 2)
            A = -torch.exp(torch.randn(2 * E, N, generator=g) * 0.5)
            D, bias = torch.randn(2 * E, generator=g), torch.randn(2 * E, generator=g) - 2
            B, C = (torch.randn(batch, L, 2, N, generator=g).permute(0, 2, 3, 1) for _ in range(2))
            go, zs = torch.randn(batch, 2 * E, L, generator=g), torch.cat([z, z.flip(-1)], 1)

            def train(u=u, delta=delta, z=z, A=A, D=D, bias=bias, B=B, C=C, go=go, zs=zs):
                _, _, ck = _cpu.selective_scan_bidirectional_cpu(u, delta, A, B, C, D, z, bias, True, "mean",
                                                                 checkpoints=True)
                _cpu_bwd.selective_scan_cpu_backward(u, delta, A, B, C, D, zs, bias, True, go, None, ck)

            cases.append(("scan fwd + bwd (training)", batch, train))
        for name, batch, fn in cases:
            best = {n: float("inf") for n in args.threads}
            with torch.no_grad():
                fn()
                reps = max(3, args.reps * 197 // (L * batch))
                for _ in range(reps):
                    for n in args.threads:
                        torch.set_num_threads(n)
                        t0 = time.perf_counter()
                        fn()
                        best[n] = min(best[n], time.perf_counter() - t0)
            t0 = best[args.threads[0]]
            cells = " | ".join(f"{best[n] * 1e3:.3f}" for n in args.threads)
            speed = ", ".join(f"{t0 / best[n]:.2f}x" for n in args.threads[1:])
            print(f"| {name} | {L} | {batch} | {cells} | {speed} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vim_tiny", "deit_tiny_patch16_224"])
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 512, 1024])
    p.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    p.add_argument("--kernels", action="store_true", help="time the Vim-Ti layer's C kernels (see above)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return
    if min(args.threads) < 1 or args.rounds < 1 or args.reps < 1:
        sys.exit("bench_threads: --threads, --rounds and --reps must be positive")
    if args.kernels:
        kernels(args)
        return

    cells = list(itertools.product(args.sizes, args.modes, args.dtypes, args.threads, args.models))
    results: dict[tuple, list[float]] = {c: [] for c in cells}
    for r in range(args.rounds):
        for cell in cells:
            size, mode, dtype, threads, model = cell
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--size", str(size), "--mode", mode,
                   "--dtype", dtype, "--threads", str(threads), "--reps", str(args.reps),
                   "--train-batch", str(args.train_batch)]
            env = {**__import__("os").environ, "OMP_NUM_THREADS": str(threads)}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                print(f"round {r}: {cell}: timed out", file=sys.stderr)
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                print(f"round {r}: {cell}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            results[cell].append(json.loads(lines[-1])["ms"])
            print(f"round {r}: {model} {size} {mode} {dtype} {threads} thread(s): {results[cell][-1]:.1f} ms",
                  file=sys.stderr, flush=True)

    def med(cell):
        return statistics.median(results[cell]) if results[cell] else None

    t0, ref = args.threads[0], args.models[-1]
    print(f"median over {args.rounds} rounds of the median of {args.reps} calls, ms (train: batch "
          f"{args.train_batch}); speed-up vs {t0} thread(s); ratio vs {ref}\n")
    print("| model | size | mode | dtype | threads | ms | speed-up | vs " + ref + " |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for cell in cells:
        size, mode, dtype, threads, model = cell
        ms, base, other = med(cell), med((size, mode, dtype, t0, model)), med((size, mode, dtype, threads, ref))
        fmt = lambda v, f: f.format(v) if v is not None else ""  # noqa: E731
        speed = base / ms if ms and base else None
        ratio = ms / other if ms and other else None
        print(f"| {model} | {size} | {mode} | {dtype} | {threads} | {fmt(ms, '{:.1f}')} | {fmt(speed, '{:.2f}x')} "
              f"| {fmt(ratio, '{:.2f}x')} |")


if __name__ == "__main__":
    main()
