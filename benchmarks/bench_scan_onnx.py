#!/usr/bin/env python
"""Vim's selective scan alone in onnxruntime against visionzoo's C kernel, one thread (issue 17).

    OMP_NUM_THREADS=1 python benchmarks/bench_scan_onnx.py [--length 197] [--rounds 5] [--calls 20]

One stacked scan at Vim-Ti size (batch 1, 2 x 384 channels, N = 16, two groups: the two directions, with
D, the gate and softplus(delta + bias)) is exported with the dynamo ONNX exporter through the exporters'
implementation (:func:`visionzoo.ops.selective_scan._export.selective_scan_scan`, one ONNX ``Scan``), checked
against the reference scan, then timed: onnxruntime (1 intra-op thread) and the ``cpu`` backend
(:func:`visionzoo.ops.selective_scan.selective_scan`) take turns, ``--rounds`` rounds of ``--calls`` calls each;
the table gives the median over rounds of each round's minimum, in ms.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    import onnxruntime as ort

    from visionzoo.ops.selective_scan import selective_scan
    from visionzoo.ops.selective_scan._export import STEPS, selective_scan_scan
    from visionzoo.ops.selective_scan._reference import selective_scan_reference

    torch.set_num_threads(1)
    torch.manual_seed(0)
    L, dim, N = args.length, 768, 16
    A, D, bias = -torch.rand(dim, N) * 4 - 0.5, torch.randn(dim), torch.randn(dim) * 0.3

    class Scan(torch.nn.Module):
        def forward(self, u, delta, B, C, z):
            return selective_scan_scan(u, delta, A, B, C, D, z, bias, True)[0]

    u, delta, z = (torch.randn(1, L, dim).transpose(1, 2) for _ in range(3))
    B, C = (torch.randn(1, L, 2, N).permute(0, 2, 3, 1) for _ in range(2))
    inputs = (u, delta * 0.5, B, C, z)
    with torch.no_grad():
        ref = selective_scan_reference(u, delta * 0.5, A, B, C, D, z, bias, True)[0]
        t0 = time.perf_counter()
        program = torch.onnx.export(Scan(), inputs, dynamo=True, verbose=False)
        export_s = time.perf_counter() - t0
    path = Path(tempfile.mkdtemp()) / "scan.onnx"
    program.save(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.contiguous().numpy() for i, t in zip(session.get_inputs(), inputs)}
    out = torch.from_numpy(session.run(None, feeds)[0])
    rel = float((out - ref).abs().max() / ref.abs().max())

    def c_kernel():
        with torch.no_grad():
            selective_scan(u, delta * 0.5, A, B, C, D, z, bias, True, backend="cpu")

    runs = {"onnxruntime Scan": lambda: session.run(None, feeds), "C kernel (cpu backend)": c_kernel}
    best = {k: [] for k in runs}
    for fn in runs.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name].append(min(times))
    print(f"L={L}, 2 x {dim // 2} channels, N={N}, {STEPS} steps per Scan iteration; export {export_s:.1f} s, "
          f"onnxruntime vs reference: {rel:.1e} relative\n")
    print("| implementation | ms |\n|---|---:|")
    for name, v in best.items():
        print(f"| {name} | {statistics.median(v) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
