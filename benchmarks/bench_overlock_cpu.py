#!/usr/bin/env python
"""CPU timings for OverLoCK: the ``na2d_av`` backends and ``overlock_xt`` against the official algorithm.

    python benchmarks/bench_overlock_cpu.py --op              # na2d_av backends, forward and fwd+bwd
    python benchmarks/bench_overlock_cpu.py --model           # overlock_xt at 224, batch 1
    python benchmarks/bench_overlock_cpu.py --op --model --rounds 7 --threads 1

Model rows (224x224, batch 1, eval mode, fp32; forward under ``inference_mode``, fwd+bwd = forward with
grad + ``logits.sum().backward()``):

* ``visionzoo``: ``timm.create_model("overlock_xt")`` as registered (deploy form, ``auto`` backend).
* ``visionzoo, reference op``: the same model with ``contmix_backend="reference"`` (gather + einsum).
* ``visionzoo, train form``: ``deploy=False`` (dilated branches unfolded) with the ``auto`` backend.
* ``official (stand-in)``: the official forward, ported op for op in ``tests/models/overlock_official.py``,
  on the official training-form weights, with a pure-PyTorch ``na2d_av`` (``contmix.py``'s
  unfold + replicate-pad fallback) in place of NATTEN. The official file itself cannot run here
  (it imports natten and mmengine at module level).

Every timing is the median of ``--rounds`` rounds of ``--reps`` calls after warm-up; the variants take
turns inside every round, so drift on a shared machine hits all alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import visionzoo  # noqa: E402,F401
from tests.models.overlock_official import OFFICIAL_CFGS, official_overlock_forward, to_official  # noqa: E402
from visionzoo.ops.neighborhood_aggregation import na2d_av  # noqa: E402

# XT's ContMix calls at 224 (B, G, H, W, c, K), plus a detection-sized stride-16 map.
OP_SHAPES = [
    ("xt s3 5x5", (1, 8, 14, 14, 16, 5)),
    ("xt s3 13x13", (1, 8, 14, 14, 16, 13)),
    ("xt s4 7x7", (1, 12, 7, 7, 14, 7)),
    ("b32 s3 13x13", (32, 8, 14, 14, 16, 13)),
    ("det 50x84 13x13", (1, 8, 50, 84, 16, 13)),
]


def _time(fns: dict, rounds: int, reps: int, warmup: int = 1) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_op(rounds: int, reps: int) -> None:
    print("| shape (B, G, H, W, c, K) | backend | forward (ms) | fwd+bwd (ms) |\n|---|---|---|---|")
    for label, (B, G, H, W, c, K) in OP_SHAPES:
        attn = torch.randn(B, G, H, W, K * K).softmax(-1)
        value = torch.randn(B, G, H, W, c)
        backends = ["reference", "dense", "taps"] if H * W <= 1024 else ["reference", "taps"]  # dense: HW^2 floats
        fns, fbs = {}, {}
        for be in backends:
            def fwd(be=be):
                with torch.inference_mode():
                    na2d_av(attn, value, K, backend=be)

            a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()

            def fb(be=be, a=a, v=v):
                na2d_av(a, v, K, backend=be).sum().backward()
            fns[be], fbs[be] = fwd, fb
        tf = _time(fns, rounds, reps)
        tb = _time(fbs, rounds, max(1, reps // 2))
        for be in backends:
            print(f"| {label} {(B, G, H, W, c, K)} | {be} | {tf[be] * 1e3:.2f} | {tb[be] * 1e3:.2f} |")


def bench_model(rounds: int, reps: int) -> None:
    torch.manual_seed(0)
    train = timm.create_model("overlock_xt", deploy=False, use_aux_head=True).eval()
    official_sd = to_official(train.state_dict())
    path = ROOT / "benchmarks" / ".overlock_xt_bench.pth"
    torch.save({"model": official_sd}, path)
    try:
        ours = timm.create_model("overlock_xt", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        ours_ref = timm.create_model("overlock_xt", pretrained=True, contmix_backend="reference",
                                     pretrained_cfg_overlay=dict(file=str(path))).eval()
    finally:
        path.unlink()
    cfg = OFFICIAL_CFGS["overlock_xt"]
    x = torch.randn(1, 3, 224, 224)
    official = official_overlock_forward.__wrapped__  # without the no_grad decorator, for fwd+bwd
    official_params = [v.requires_grad_() for k, v in official_sd.items() if v.is_floating_point() and "running" not in k]
    with torch.no_grad():
        err = (ours(x) - official_overlock_forward(official_sd, x, cfg)[0]).abs().max().item()
    print(f"max |visionzoo - official| on these logits: {err:.2e}")

    def fwd(fn):
        def run():
            with torch.inference_mode():
                fn()
        return run

    fwds = {
        "visionzoo": fwd(lambda: ours(x)),
        "visionzoo, reference op": fwd(lambda: ours_ref(x)),
        "visionzoo, train form": fwd(lambda: train(x)),
        "official (stand-in)": fwd(lambda: official(official_sd, x, cfg)),
    }
    fbs = {
        "visionzoo": lambda: ours(x).sum().backward(),
        "visionzoo, reference op": lambda: ours_ref(x).sum().backward(),
        "visionzoo, train form": lambda: train(x).sum().backward(),
        "official (stand-in)": lambda: official(official_sd, x, cfg)[0].sum().backward(),
    }
    tf = _time(fwds, rounds, reps)
    tb = _time(fbs, rounds, max(1, reps // 2))
    base_f, base_b = tf["official (stand-in)"], tb["official (stand-in)"]
    print("| overlock_xt, 224, batch 1 | forward (ms) | vs official | fwd+bwd (ms) | vs official |\n|---|---|---|---|---|")
    for k in fwds:
        print(f"| {k} | {tf[k] * 1e3:.1f} | {base_f / tf[k]:.2f}x | {tb[k] * 1e3:.1f} | {base_b / tb[k]:.2f}x |")
    del official_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="store_true")
    p.add_argument("--model", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, timm {timm.__version__}, threads {args.threads}, "
          f"median of {args.rounds} rounds x {args.reps} reps")
    if args.op or not args.model:
        bench_op(args.rounds, args.reps)
    if args.model or not args.op:
        bench_model(args.rounds, args.reps)


if __name__ == "__main__":
    main()
