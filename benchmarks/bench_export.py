#!/usr/bin/env python
"""Export each model (default: the smallest variant of every family) to ONNX and torch.export at 224, batch
dynamic, and measure: export time, ONNX node count, parity with eager (onnxruntime CPU; batch 1 and 3 from one
file, and a photo), 1-thread latency of eager vs onnxruntime (alternating rounds, medians), and int8: torch's
``quantize_dynamic`` on Linear layers and onnxruntime's ``quantize_dynamic`` of the file (cosine similarity of
the logits to fp32 eager, latency). One JSON line per model; ``--markdown`` prints the table rows.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --models vim_tiny biformer_tiny --out-dir /tmp/onnx
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.export import (check, example_input, export_onnx, export_program, onnx_node_count, onnx_session,
                              quantize_onnx, real_photo, save)

FAMILIES = ("vim_tiny", "biformer_tiny", "overlock_xt", "patnet_t0", "dependencyvit_tiny", "sparsifiner_deit_small")


def _rounds(fns: dict, x: torch.Tensor, rounds: int) -> dict:
    """Median ms of each function, timed round-robin (every round runs each once) after one warm-up round."""
    times = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn(x)
            if r:
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def measure(name: str, size: int, out_dir: Path, rounds: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    row: dict = {"model": name, "img_size": size}
    start = time.perf_counter()
    path = save(export_onnx(model, size), out_dir / f"{name}.onnx")
    row["onnx_export_s"] = time.perf_counter() - start
    row["onnx_nodes"] = onnx_node_count(path)
    row["onnx_mb"] = path.stat().st_size / 2**20
    report = check(model, path, size, threads=1, reps=1, tolerance=float("inf"))  # recorded, judged in the table
    row["onnx_rel_diff"] = report.worst
    row["onnx_rel_diff_per_input"] = {name: rel for name, _, _, _, rel in report.rows}
    start = time.perf_counter()
    program = export_program(model, size)
    row["pt2_export_s"] = time.perf_counter() - start
    module = program.module()
    rel = []
    for batch in (1, 3):
        x = example_input(model, size, batch=batch, seed=batch)
        with torch.no_grad():
            ref = model(x)
            rel.append(((module(x) - ref).abs().max() / ref.abs().max()).item())
    row["pt2_rel_diff"] = max(rel)

    qpath = quantize_onnx(path, out_dir / f"{name}.int8.onnx")
    session, qsession = onnx_session(path, threads=1), onnx_session(qpath, threads=1)
    qtorch = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    photo = real_photo(model, size)
    x = torch.cat([photo, example_input(model, size, batch=1, seed=5)])
    with torch.no_grad():
        ref = model(x)
        row["torch_int8_cos"] = _cos(qtorch(x), ref)
    row["ort_int8_cos"] = _cos(torch.from_numpy(qsession.run(None, {"image": x.numpy()})[0]), ref)

    def ort(s):
        return lambda t: s.run(None, {"image": t.numpy()})

    with torch.no_grad():
        ms = _rounds({"eager": model, "ort": ort(session), "eager_int8": qtorch, "ort_int8": ort(qsession)},
                     photo, rounds)
    row.update({f"{k}_ms": v for k, v in ms.items()})
    return row


def markdown(row: dict) -> str:
    return (f"| {row['model']} | {row['onnx_export_s']:.0f} | {row['onnx_nodes']} | {row['onnx_rel_diff']:.1e} "
            f"| {row['pt2_rel_diff']:.1e} | {row['eager_ms']:.1f} | {row['ort_ms']:.1f} "
            f"| {row['ort_ms'] / row['eager_ms']:.2f}x | {row['ort_int8_ms']:.1f} | {row['ort_int8_cos']:.4f} "
            f"| {row['eager_int8_ms']:.1f} | {row['torch_int8_cos']:.4f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(FAMILIES))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out-dir", default="/tmp/visionzoo_export")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        row = measure(name, args.img_size, out_dir, args.rounds)
        print(markdown(row) if args.markdown else json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
