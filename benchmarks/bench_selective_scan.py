"""CPU timing of visionzoo.ops.selective_scan at the Vim-Tiny size.

Vim-Tiny calls the scan 24 times per forward with both directions stacked along the channels:
batch=1, dim=768 (2 x 384), L=197, N=16, grouped B/C (G=2), D, z and delta_bias given, softplus on.

    PYTHONPATH=. python benchmarks/bench_selective_scan.py --threads 1 [--lengths 197 1025 4097] [--breakdown]

Variants are interleaved round-robin and the minimum and median over rounds are printed, because
timings on a shared VM drift by tens of percent from one second to the next.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from visionzoo.ops import is_available
from visionzoo.ops.selective_scan import selective_scan


def make_inputs(batch, dim, length, dstate, groups, time_major=False, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 1.0,
        "A": -torch.exp(torch.randn(dim, dstate, generator=g) * 0.5 + 1.0),
        "B": torch.randn(batch, groups, dstate, length, generator=g),
        "C": torch.randn(batch, groups, dstate, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.1,
    }
    if time_major:  # (b, d, L) views of (b, L, d) memory, as produced by nn.Linear on (b, L, C) tokens
        for k in ("u", "delta", "z"):
            x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    if requires_grad:
        x = {k: v.requires_grad_() for k, v in x.items()}
    return x


def forward(x, backend):
    def f():
        with torch.no_grad():
            selective_scan(**x, delta_softplus=True, backend=backend)
    return f


def forward_backward(x, backend):
    grad = torch.randn(x["u"].shape)

    def f():
        for v in x.values():
            v.grad = None
        selective_scan(**x, delta_softplus=True, backend=backend).backward(grad)
    return f


# Process CPU time (all threads): on a shared machine it is far steadier than wall time, and with
# one thread it equals the wall time of a quiet machine. --wall switches to time.perf_counter.
CLOCK = time.process_time


def bench(variants, rounds, inner):
    for f in variants.values():  # warm-up
        f()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, f in variants.items():
            t0 = CLOCK()
            for _ in range(inner):
                f()
            times[name].append((CLOCK() - t0) / inner * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def breakdown(shape, rounds):
    """Time the stages of the ``chunked`` forward in isolation (same inputs; each stage is the torch op that
    backend runs, on the time-major layouts it uses: per-channel ``(L, b, d)``, per-state ``(L, b, G, N, d/G)``,
    blocks of ``T`` steps with ``T * b * d * N`` ~ 2^19, at most 64, as in the package docstring)."""
    import math

    import torch.nn.functional as F

    x = make_inputs(*shape)
    b, d, L = x["u"].shape
    G, N = x["B"].shape[1], x["B"].shape[2]
    dg, T = d // G, max(1, min(64, (1 << 19) // (b * d * N)))

    def time_major(t):  # (b, d, L) -> contiguous (L, b, d)
        return t.permute(2, 0, 1).contiguous()

    def prepare():
        dT = F.softplus(time_major(x["delta"]) + x["delta_bias"])
        BT, CT = (x[k].permute(3, 0, 1, 2).contiguous() for k in ("B", "C"))  # (L, b, G, N)
        A2 = x["A"].reshape(G, dg, N).transpose(1, 2).contiguous() * math.log2(math.e)  # (G, N, dg)
        return dT, dT * time_major(x["u"]), BT, CT, A2

    dT_pre = time_major(x["delta"]) + x["delta_bias"]
    dT, duT, BT, CT, A2 = prepare()
    H = torch.zeros(T + 1, b, G, N, dg)
    dA = torch.empty(T, b, G, N, dg)
    Hs, dAs = H.unbind(0), dA.unbind(0)
    y = torch.empty(L, b, d)
    blocks = [(s, min(T, L - s)) for s in range(0, L, T)]

    def exp_arg():
        for s, n in blocks:
            torch.mul(dT[s:s + n].view(n, b, G, 1, dg), A2, out=dA[:n])

    def exp2():
        for s, n in blocks:
            dA[:n].exp2_()

    def dbu():
        for s, n in blocks:
            torch.mul(duT[s:s + n].view(n, b, G, 1, dg), BT[s:s + n].view(n, b, G, N, 1), out=H[1:n + 1])

    def recurrence():
        for s, n in blocks:
            for i in range(n):
                Hs[i + 1].addcmul_(dAs[i], Hs[i])

    def contraction():
        for s, n in blocks:
            rows = n * b * G
            torch.bmm(CT[s:s + n].view(rows, 1, N), H[1:n + 1].view(rows, N, dg), out=y[s:s + n].view(rows, 1, dg))

    def finish():
        out = y.permute(1, 2, 0).contiguous()
        out.addcmul_(x["u"], x["D"][:, None])
        out.mul_(F.silu(x["z"]))

    stages = {
        "prepare (2 transposes, bias, softplus, delta*u)": prepare,
        "  of which softplus": lambda: F.softplus(dT_pre),
        "  of which one (b,d,L) transpose": lambda: time_major(x["u"]),
        f"delta*A (T={T})": exp_arg,
        "exp2": exp2,
        "delta*u*B": dbu,
        "recurrence (L addcmul_)": recurrence,
        "y = C.h (bmm)": contraction,
        "finish (transpose, +D*u, *silu(z))": finish,
    }
    return bench(stages, rounds, inner=5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--lengths", type=int, nargs="+", default=[197],
                    help="sequence lengths (Vim-Ti tokens: 197 at 224, 1025 at 512, 4097 at 1024)")
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also time the stages of the chunked forward")
    ap.add_argument("--wall", action="store_true", help="time with perf_counter instead of process CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    torch.set_num_threads(args.threads)
    for length in args.lengths:
        run_length(args, length)


def run_length(args, length):
    shape = (args.batch, args.dim, length, args.dstate, args.groups)
    print(f"\ntorch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"batch={shape[0]} dim={shape[1]} L={shape[2]} N={shape[3]} G={shape[4]}, "
          f"clock={'wall' if args.wall else 'process CPU time'}")
    fast = {}
    for backend in ("chunked", "cpu"):
        if not is_available("selective_scan", backend, "cpu"):
            continue
        fast[f"{backend} fwd"] = forward(make_inputs(*shape), backend)
        fast[f"{backend} fwd (time-major u/delta/z)"] = forward(make_inputs(*shape, time_major=True), backend)
        fast[f"{backend} fwd+bwd"] = forward_backward(make_inputs(*shape, requires_grad=True), backend)
    results = bench(fast, args.rounds, inner=5 if length < 1000 else 1)
    if not args.skip_reference and length < 1000:
        slow = {
            "reference fwd": forward(make_inputs(*shape), "reference"),
            "reference fwd+bwd": forward_backward(make_inputs(*shape, requires_grad=True), "reference"),
        }
        results.update(bench(slow, max(3, args.rounds // 6), inner=1))
    if args.breakdown:
        results.update({"[stage] " + k: v for k, v in breakdown(shape, args.rounds).items()})
    for name, (best, median) in results.items():
        print(f"{name:56s} min {best:8.2f} ms   median {median:8.2f} ms")


if __name__ == "__main__":
    main()
