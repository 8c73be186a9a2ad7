#!/usr/bin/env python
"""CPU latency and throughput of PATNet-T0/T1/T2 against timm's FasterNet-T0/T1/T2, deployed form.

    python benchmarks/bench_patnet_cpu.py                       # batch 1 latency + batch 32 throughput
    python benchmarks/bench_patnet_cpu.py --rounds 5 --reps 20 --b32-reps 3

Deployed form: PATNet through ``timm.utils.model.reparameterize_model`` (its ``reparameterize()``
folds every foldable BN); timm's FasterNet has no fusion method, so its conv+BN pairs (stem, merges,
MLP) are folded here the way the official ``utils/fuse_conv_bn.py`` does, and it runs with the
partial-conv forward named on the command line (``slicing`` is the official inference form).

Latency: batch 1, 224x224, ``torch.set_num_threads(--threads)``, median over ``--rounds`` rounds
of ``--reps`` timed forwards; the models take turns within every round so that drift on a shared
machine hits all of them alike. Throughput: batch 32, median of ``--b32-reps`` forwards per round.
Parameters are counted before deployment (the papers' convention) and after; GMACs come from
``visionzoo.utils.count_macs`` (torch FlopCounter, MACs, BN not counted).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from timm.utils.model import reparameterize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzoo  # noqa: E402,F401  (registers the models)
from visionzoo.utils import count_macs, count_params  # noqa: E402

PAIRS = (("patnet_t0", "fasternet_t0"), ("patnet_t1", "fasternet_t1"), ("patnet_t2", "fasternet_t2"))


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_fasternet(model: nn.Module) -> nn.Module:
    """Fold conv -> BN pairs: ``proj/norm`` (stem), ``reduction/norm`` (merges), ``mlp[0]/mlp[1]``."""
    for module in list(model.modules()):
        for conv_name, bn_name in (("proj", "norm"), ("reduction", "norm")):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, _fold(conv, bn))
                setattr(module, bn_name, nn.Identity())
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                    module[i] = _fold(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
    return model


def deployed(name: str, pconv: str) -> nn.Module:
    if name.startswith("fasternet"):
        return fold_fasternet(timm.create_model(name, pconv_fw_type=pconv).eval())
    return reparameterize_model(timm.create_model(name).eval())


def timed(model: nn.Module, x: torch.Tensor, reps: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20, help="timed batch-1 forwards per model and round")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--b32-reps", type=int, default=2, help="timed batch-32 forwards per model and round (0: skip)")
    p.add_argument("--fasternet-pconv", default="slicing", choices=("slicing", "split_cat"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    names = [n for pair in PAIRS for n in pair]
    models = {n: deployed(n, args.fasternet_pconv) for n in names}
    x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
    lat = {n: [] for n in names}
    thr = {n: [] for n in names}
    for n in names:
        timed(models[n], x1, args.warmup)
        if args.b32_reps:
            timed(models[n], x32, 1)
    for _ in range(args.rounds):
        for n in names:
            lat[n] += timed(models[n], x1, args.reps)
            if args.b32_reps:
                thr[n] += [32 / t for t in timed(models[n], x32, args.b32_reps)]

    print(f"torch {torch.__version__}, timm {timm.__version__}, {platform.machine()} "
          f"{platform.processor() or ''}, {args.threads} thread(s), 224x224, FasterNet pconv={args.fasternet_pconv}")
    print("| model | params (train) | params (deployed) | GMACs | latency b1 (ms, median) | b1 min / p10-p90 (ms) "
          "| throughput b32 (img/s, median) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        q = statistics.quantiles(lat[n], n=10)
        train_params = count_params(timm.create_model(n))
        row = [n, f"{train_params / 1e6:.2f}M", f"{count_params(models[n]) / 1e6:.2f}M",
               f"{count_macs(n) / 1e9:.3f}", f"{statistics.median(lat[n]) * 1e3:.2f}",
               f"{min(lat[n]) * 1e3:.2f} / {q[0] * 1e3:.2f}-{q[-1] * 1e3:.2f}",
               f"{statistics.median(thr[n]):.1f}" if thr[n] else "-"]
        print("| " + " | ".join(row) + " |")
    print()
    for pat, fast in PAIRS:
        ratio = statistics.median(lat[pat]) / statistics.median(lat[fast])
        best = min(lat[pat]) / min(lat[fast])
        print(f"{pat} / {fast} batch-1 latency, median: {ratio:.3f} ({(1 - ratio) * 100:.1f}% lower for PATNet); "
              f"min: {best:.3f} ({(1 - best) * 100:.1f}% lower)")


if __name__ == "__main__":
    main()
