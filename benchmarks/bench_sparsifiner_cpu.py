#!/usr/bin/env python
"""Sparsifiner on CPU: the official dense-then-mask attention against the sparse backends.

    python benchmarks/bench_sparsifiner_cpu.py                       # attention block + whole model, 224/384/512
    python benchmarks/bench_sparsifiner_cpu.py --sizes 384 --rounds 5 --parts model
    python benchmarks/bench_sparsifiner_cpu.py --device cuda --batch 64 --sizes 224 384   # on a GPU

Batch ``--batch`` (8), fp32, eval mode, forward under ``torch.inference_mode()``; median over
``--rounds`` rounds, the backends taking turns inside every round so drift on a shared machine hits
them alike. Models are built at each size (``img_size=s``: the predictor has the official
``K = N // 6`` basis vectors for that token count); with ``--dynamic`` they are built at 224 and run at
each size with ``dynamic_img_size=True`` (K = 32, token rows resampled), i.e. a 224-trained model.

* ``block``: one ``SparsifinerAttention`` (qkv, predictor, attention, proj) on ``(B, N, 384)`` tokens.
* ``model``: ``sparsifiner_deit_small`` end to end.
* Backends: ``reference`` (official: dense scores, ``-inf`` mask, softmax, ``nan_to_num``, ``@ v``),
  ``masked`` (fused SDPA with an additive mask; ``auto`` on CPU), ``gather`` (kept entries only),
  ``triton`` (fused kernel, CUDA only; ``auto`` there; in the default list with ``--device cuda``).
  The official code additionally computes an unmasked softmax copy of every score matrix for its
  losses; ``reference`` leaves that out, so it is a slightly *faster* baseline than the official code.
* GMACs by ``visionzoo.utils.count_macs`` (FlopCounterMode, custom-op formulas), batch 1: total as
  executed by ``reference`` (dense), total with the sparse op (its kept connections), and the
  attention-map part alone (``q k^T`` + ``p v``) per backend, against dense DeiT-S.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import timm  # noqa: E402
import visionzoo  # noqa: E402,F401
from visionzoo.utils import count_macs  # noqa: E402

BACKENDS = ("reference", "masked", "gather", "triton")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fns, rounds, device):
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for k, fn in fns.items():
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t)
    _time.last = times
    return {k: statistics.median(v) for k, v in times.items()}


def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend


def attention_macs(size):
    """MACs of q k^T and p v per backend at batch 1 (FlopCounterMode, per module)."""
    out = {}
    for backend in ("reference", "masked"):
        with torch.device("meta"):
            model = timm.create_model("sparsifiner_deit_small", img_size=size, attn_backend=backend).eval()
            x = torch.empty(1, 3, size, size)
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model(x)
        counts = counter.get_flop_counts()
        total = 0
        for i in range(len(model.blocks)):
            mod = counts.get(f"Sparsifiner.blocks.{i}.attn", {})
            pred = counts.get(f"Sparsifiner.blocks.{i}.attn.mask_predictor", {})
            attn = sum(v for k, v in mod.items()) - sum(v for k, v in pred.items())
            # minus the qkv and proj linears
            lin = sum(v for k, v in counts.get(f"Sparsifiner.blocks.{i}.attn.qkv", {}).items())
            lin += sum(v for k, v in counts.get(f"Sparsifiner.blocks.{i}.attn.proj", {}).items())
            total += attn - lin
        out[backend] = total // 2
    n = (size // 16) ** 2 + 1
    out["dense_deit"] = 12 * 2 * 6 * n * n * 64
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parts", nargs="+", default=["flops", "block", "model"])
    ap.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                    help="default: reference masked gather, plus triton on CUDA")
    ap.add_argument("--dynamic", action="store_true",
                    help="build at 224 with dynamic_img_size=True (predictor rank K=32 resampled to each size)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.backends is None:
        args.backends = [b for b in BACKENDS if b != "triton" or args.device.startswith("cuda")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"device {device}, batch {args.batch}, rounds {args.rounds}")
    results = []
    for size in args.sizes:
        n = (size // 16) ** 2 + 1
        row = dict(size=size, tokens=n)
        if "flops" in args.parts:
            inp = (1, 3, size, size)
            row["gmacs_dense_deit"] = count_macs("deit_small_patch16_224", input_size=inp, img_size=size) / 1e9
            row["gmacs_reference"] = count_macs("sparsifiner_deit_small", input_size=inp, img_size=size,
                                                attn_backend="reference") / 1e9
            row["gmacs_sparse"] = count_macs("sparsifiner_deit_small", input_size=inp, img_size=size) / 1e9
            am = attention_macs(size)
            row["attn_gmacs_dense"] = am["dense_deit"] / 1e9
            row["attn_gmacs_reference"] = am["reference"] / 1e9
            row["attn_gmacs_sparse"] = am["masked"] / 1e9
            print(f"{size}: GMACs total dense DeiT-S {row['gmacs_dense_deit']:.3f} | Sparsifiner as executed "
                  f"(reference) {row['gmacs_reference']:.3f} | sparse op {row['gmacs_sparse']:.3f}; attention map "
                  f"(qk+pv) dense {row['attn_gmacs_dense']:.3f} sparse {row['attn_gmacs_sparse']:.3f} "
                  f"(-{100 * (1 - row['attn_gmacs_sparse'] / row['attn_gmacs_dense']):.1f}%)", flush=True)
        build = dict(dynamic_img_size=True) if args.dynamic else dict(img_size=size)
        model = timm.create_model("sparsifiner_deit_small", **build).eval().to(device)
        if "block" in args.parts:
            attn = model.blocks[0].attn
            x = torch.randn(args.batch, n, 384, device=device)
            grid = (size // 16, size // 16)

            def run(b):
                def f():
                    attn.attn_backend = b
                    attn(x, grid)
                return f
            t = _time({b: run(b) for b in args.backends}, args.rounds, device)
            row.update({f"block_ms_{b}": 1e3 * v for b, v in t.items()})
            row.update({f"block_ms_min_{b}": 1e3 * min(v) for b, v in _time.last.items()})
            print(f"{size}: attention block ms " + " ".join(f"{b} {1e3 * v:.1f}" for b, v in t.items())
                  + " | speed-up vs reference " + " ".join(f"{b} {t['reference'] / t[b]:.2f}x" for b in t if b != "reference"),
                  flush=True)
        if "model" in args.parts:
            x = torch.randn(args.batch, 3, size, size, device=device)

            def runm(b):
                def f():
                    _set_backend(model, b)
                    model(x)
                return f
            t = _time({b: runm(b) for b in args.backends}, args.rounds, device)
            row.update({f"model_ms_{b}": 1e3 * v for b, v in t.items()})
            best = {b: min(v) for b, v in _time.last.items()}
            row.update({f"model_ms_min_{b}": 1e3 * v for b, v in best.items()})
            ups = " ".join(f"{b} {best['reference'] / best[b]:.2f}x" for b in best if b != "reference"
                           and "reference" in best)
            print(f"{size}: whole model ms, minimum over rounds "
                  + " ".join(f"{b} {1e3 * v:.0f}" for b, v in best.items()) + " | speed-up vs reference " + ups,
                  flush=True)
            print(f"{size}: whole model ms " + " ".join(f"{b} {1e3 * v:.0f}" for b, v in t.items())
                  + " | speed-up vs reference " + " ".join(f"{b} {t['reference'] / t[b]:.2f}x" for b in t if b != "reference"),
                  flush=True)
        results.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
