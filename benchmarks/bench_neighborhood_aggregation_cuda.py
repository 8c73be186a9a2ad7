"""``na2d_av`` (OverLoCK's ContMix aggregation) on CUDA: triton vs dense / taps vs reference.

Op table: forward and forward + backward (grads of ``attn`` and ``value``) at overlock_t's four ContMix
calls at 224 (batch 64: stage 3 is 14x14 with G=8, c=16, K=5 and K=13; stage 4 is 7x7 with G=16,
c=16, K=5 and K=7) plus one detection-sized map (where ``dense`` is not run), with each backend's max
abs error against ``reference`` (the first column to read: every fast backend should be ~1e-6 in fp32).
Model table: ``overlock_xt`` at 224, batch 64, forward (inference mode) and forward + backward, per
``contmix_backend``. Times are the median of ``--reps`` CUDA-event-timed calls after a warm-up call
(which includes Triton's compilation). Meant to finish in well under a minute on one H200::

    python benchmarks/bench_neighborhood_aggregation_cuda.py            # fp32
    python benchmarks/bench_neighborhood_aggregation_cuda.py --bf16     # also bf16 (triton / dense only)
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import visionzoo  # noqa: F401 - registers the models
from visionzoo.models.overlock import ContMixBlock
from visionzoo.ops import is_available, resolve
from visionzoo.ops.neighborhood_aggregation import na2d_av

DEV = "cuda"

OP_SHAPES = [  # label, (B, G, H, W, c, K)
    ("t s3 5x5", (64, 8, 14, 14, 16, 5)),
    ("t s3 13x13", (64, 8, 14, 14, 16, 13)),
    ("t s4 5x5", (64, 16, 7, 7, 16, 5)),
    ("t s4 7x7", (64, 16, 7, 7, 16, 7)),
    ("det 50x84 13x13", (2, 8, 50, 84, 16, 13)),
]


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls (after one warm-up call)."""
    fn()
    if DEV != "cuda":  # smoke test on CPU
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def bench_op(dtypes, reps: int, shapes) -> None:
    print("| shape (B, G, H, W, c, K) | dtype | backend | forward (ms) | fwd+bwd (ms) | max err vs reference |")
    print("|---|---|---|---|---|---|")
    for label, (B, G, H, W, c, K) in shapes:
        g = torch.Generator(device=DEV).manual_seed(0)
        attn32 = torch.randn(B, G, H, W, K * K, device=DEV, generator=g).softmax(-1)
        value32 = torch.randn(B, G, H, W, c, device=DEV, generator=g)
        gout32 = torch.randn(B, G, H, W, c, device=DEV, generator=g)
        a = attn32.clone().requires_grad_()
        v = value32.clone().requires_grad_()
        ref_out = na2d_av(a, v, K, backend="reference")
        ref = (ref_out.detach(), *torch.autograd.grad(ref_out, (a, v), gout32))
        for dtype in dtypes:
            attn, value, gout = attn32.to(dtype), value32.to(dtype), gout32.to(dtype)
            backends = ["triton", "dense", "taps", "reference"] if H * W <= 1024 else ["triton", "taps", "reference"]
            if dtype != torch.float32:
                backends = [b for b in backends if b in ("triton", "dense")]
            for be in backends:
                if be == "triton" and not is_available("neighborhood_aggregation", "triton", DEV):
                    print(f"| {label} | {dtype} | triton | not available | | |")
                    continue
                ai, vi = attn.clone().requires_grad_(), value.clone().requires_grad_()

                def fwd(be=be, attn=attn, value=value, K=K):
                    with torch.inference_mode():
                        na2d_av(attn, value, K, backend=be)

                def fb(be=be, ai=ai, vi=vi, K=K, gout=gout):
                    out = na2d_av(ai, vi, K, backend=be)
                    return (out, *torch.autograd.grad(out, (ai, vi), gout))

                got = fb()
                err = max((x.float() - r).abs().max().item() for x, r in zip(got, ref))
                tf, tb = timed(fwd, reps), timed(fb, reps)
                print(f"| {label} {(B, G, H, W, c, K)} | {str(dtype)[6:]} | {be} | {tf:.3f} | {tb:.3f} | {err:.1e} |")


def bench_model(batch: int, reps: int) -> None:
    x = torch.randn(batch, 3, 224, 224, device=DEV)
    print(f"\n| overlock_xt, 224, batch {batch}, fp32 | forward (ms) | fwd+bwd (ms) | max logit diff vs reference |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    model = timm.create_model("overlock_xt").to(DEV).eval()

    def set_backend(be):
        for m in model.modules():
            if isinstance(m, ContMixBlock):
                m.backend = be

    set_backend("reference")
    with torch.inference_mode():
        ref = model(x)
    for be in ("triton", "dense", "taps", "reference"):
        if be == "triton" and (DEV != "cuda" or not is_available("neighborhood_aggregation", "triton", DEV)):
            print(f"| contmix_backend={be} | not run | | |")  # CPU smoke test: the interpreter is too slow
            continue
        set_backend(be)
        with torch.inference_mode():
            err = (model(x) - ref).abs().max().item()

        def fwd():
            with torch.inference_mode():
                model(x)

        def fb():
            model(x).sum().backward()

        tf, tb = timed(fwd, reps), timed(fb, max(1, reps // 2))
        print(f"| contmix_backend={be} | {tf:.2f} | {tb:.2f} | {err:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bf16", action="store_true", help="also time bf16 (triton and dense)")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test of this script: stage-4 shapes at batch 1 (TRITON_INTERPRET=1 for triton), "
                        "model without triton")
    args = p.parse_args()
    global DEV
    shapes = OP_SHAPES
    if args.smoke:
        DEV = "cpu"
        shapes = [(label, (1, *s[1:])) for label, s in OP_SHAPES if label.startswith("t s4")]
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --smoke)")
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test)"
    auto = resolve("neighborhood_aggregation", "auto", torch.zeros(1, device=DEV))
    print(f"# {name}, torch {torch.__version__}, auto -> {auto}")
    bench_op([torch.float32] + ([torch.bfloat16] if args.bf16 else []), args.reps, shapes)
    if not args.no_model:
        bench_model(args.batch, args.reps)
    print(f"\n# total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
