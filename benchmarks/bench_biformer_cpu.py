#!/usr/bin/env python
"""BiFormer on CPU: the official forward and the ``reference`` BRA backend against ``auto`` (``chunked``).

    python benchmarks/bench_biformer_cpu.py                                # full table (time + memory)
    python benchmarks/bench_biformer_cpu.py --models biformer_tiny --sizes 224 --rounds 3
    python benchmarks/bench_biformer_cpu.py --memory-only --sizes 600x500 --modes fwd
    PYTHONPATH=/tmp/biformer_official/_deps python benchmarks/bench_biformer_cpu.py --models biformer_tiny \
        --sizes 224 448 --modes fwd --no-memory --variants upstream auto --official-dir /tmp/biformer_official
    python benchmarks/bench_biformer_cpu.py --op                          # BRA op alone, per stage shape
    python benchmarks/bench_biformer_cpu.py --op --device cuda --batch 64  # the same on a GPU

Whole models, batch ``--batch`` (4), fp32, ``torch.set_num_threads(--threads)``, eval mode:

* Variants: ``upstream`` is the official model itself (``BiFormer`` of ``models/biformer.py`` with the
  official ``BiLevelRoutingAttention`` of ``ops/bra_legacy.py``, built by the official ``biformer_tiny`` /
  ``biformer_small`` config), imported from ``--official-dir`` (or ``$BIFORMER_OFFICIAL_DIR``), a
  directory outside this repository holding those files exported from rayleizhu/BiFormer (``einops`` and
  ``fairscale`` importable, e.g. through ``PYTHONPATH``); it gets the visionzoo model's weights mapped to
  the official keys (strict load) and its logits are checked against visionzoo's to 1e-4 before timing.
  ``official`` is the functional port of the official forward in
  ``tests/models/biformer_official.py`` (official BRA ``bra_legacy``: region layout, ``torch.gather``
  on an expanded view, explicit matmul/softmax; run on the model's own weights); ``reference`` is the
  visionzoo model with the official BRA algorithm as its backend; ``auto`` is the visionzoo model as
  shipped. ``official`` is forward-only (it is a functional port, no training path).
* ``fwd``: forward under ``torch.inference_mode()``; ``fwd+bwd``: forward + ``out.sum().backward()``.
  Median and minimum over ``--rounds`` rounds; the variants take turns inside every round (round-robin)
  so drift on a shared machine hits them alike; also each round's time ratio against ``auto`` (its two
  runs are adjacent in time) and the median of those ratios, the estimate least hurt by load drift.
  With ``--fresh``, a round runs each variant in its own fresh process instead (build, one warm-up
  step, median of ``--calls`` steps), the variants alternating.
* Sizes: 224 and 448 with the classification setting (``n_win=7``, as the official model runs at any
  multiple of 224), and 600x500 with the official ADE20K backbone setting (``n_win=8``, ``auto_pad``).
* Peak memory: each (model, size, variant, mode) runs once more in a fresh subprocess, after building
  the model and a one-image warm-up:
  - ``live``: peak bytes of tensors created during one step (:class:`visionzoo.utils.memory.PeakLiveBytes`;
    what the dispatched ops allocate, not temporaries private to a kernel or inside a custom op);
  - ``rss``: peak resident set growth over that step (``ru_maxrss`` minus the RSS before it) with
    ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment, so that glibc returns freed blocks at once and
    the RSS follows what is allocated, kernel-private buffers included.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import timm  # noqa: E402
import visionzoo  # noqa: E402,F401

SIZES = {"224": ((224, 224), dict(n_win=7)), "448": ((448, 448), dict(n_win=7)),
         "600x500": ((600, 500), dict(n_win=8, auto_pad=True))}
VARIANTS = ("upstream", "official", "reference", "auto")
OFFICIAL_DIR_ENV = "BIFORMER_OFFICIAL_DIR"
OFFICIAL_DIR = os.environ.get(OFFICIAL_DIR_ENV)  # main() sets it from --official-dir
ARCH = {"biformer_tiny": dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512)),
        "biformer_small": dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512))}


class _Official:
    """The official forward (functional port) on a visionzoo model's weights, in official layout."""

    def __init__(self, model, name: str, size: str):
        from tests.models.biformer_official import official_biformer_forward
        from tests.models.test_biformer import _to_official

        extra = SIZES[size][1]
        self.sd = _to_official(model.state_dict())
        self.fn = official_biformer_forward
        self.kw = dict(ARCH[name], n_win=extra["n_win"], auto_pad=extra.get("auto_pad", False))

    def __call__(self, x):
        return self.fn(self.sd, x, **self.kw)


def _official_module(official_dir: str):
    """The official ``models/biformer.py`` imported from ``official_dir`` (a directory holding the
    official ``models/`` and ``ops/`` files; its imports ``einops`` and ``fairscale`` must be importable).
    Its ``@register_model`` is neutralised during the import so that it does not replace visionzoo's
    ``biformer_*`` entries in timm's registry."""
    import timm.models

    if not (Path(official_dir) / "models" / "biformer.py").is_file():
        raise SystemExit(f"bench_biformer_cpu: no official models/biformer.py under {official_dir!r} "
                         f"(export models/biformer.py, models/_common.py, ops/bra_legacy.py of rayleizhu/BiFormer)")
    if "models" in sys.modules and not str(getattr(sys.modules["models"], "__path__", [""])[0]).startswith(
            str(Path(official_dir).resolve())):
        raise SystemExit("bench_biformer_cpu: another top-level package named 'models' is already imported")
    sys.path.insert(0, str(Path(official_dir).resolve()))
    register = timm.models.register_model
    timm.models.register_model = lambda fn: fn
    try:
        return importlib.import_module("models.biformer")
    except ImportError as e:
        raise SystemExit(f"bench_biformer_cpu: importing the official BiFormer from {official_dir!r} failed: {e}")
    finally:
        timm.models.register_model = register
        sys.path.remove(str(Path(official_dir).resolve()))


def _upstream(model, name: str, size: str, x: torch.Tensor):
    """The official model class with ``name``'s official config, carrying ``model``'s weights (mapped to
    the official keys, loaded strictly); its logits are checked against ``model``'s to 1e-4 on ``x``."""
    from tests.models.test_biformer import _to_official

    if OFFICIAL_DIR is None:
        raise SystemExit(f"bench_biformer_cpu: the 'upstream' variant needs --official-dir or ${OFFICIAL_DIR_ENV}")
    extra = SIZES[size][1]
    mod = _official_module(OFFICIAL_DIR)
    cls = mod.BiFormer  # the official config functions fix n_win=7; the dense setting (600x500) overrides it
    mod.BiFormer = lambda **kw: cls(**dict(kw, n_win=extra["n_win"], auto_pad=extra.get("auto_pad", False)))
    try:
        official = getattr(mod, name)()
    finally:
        mod.BiFormer = cls
    official.load_state_dict(_to_official(model.state_dict()), strict=True)
    official.eval()
    with torch.inference_mode():
        ours, theirs = model(x), official(x)
    err = (ours - theirs).abs().max().item()
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"bench_biformer_cpu: {name} at {size}: logits differ from the official model's by {err:.2e}")
    print(f"# upstream {name} {size}: logits match visionzoo's (max abs diff {err:.1e}, batch {len(x)})", flush=True)
    return official


def _build(name: str, size: str, variant: str):
    """(model, input batch of 4); weights and input seeded, so every process builds the same ones."""
    (h, w), extra = SIZES[size]
    torch.manual_seed(0)
    backend = "reference" if variant == "official" else "auto" if variant == "upstream" else variant
    model = timm.create_model(name, attn_backend=backend, **extra).eval()
    x = torch.randn(4, 3, h, w)
    if variant == "official":
        model = _Official(model, name, size)
    elif variant == "upstream":
        model = _upstream(model, name, size, x)
    return model, x


def _step(model, x, mode: str) -> None:
    if mode == "fwd":
        with torch.inference_mode():
            model(x)
    else:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure_memory(name: str, size: str, variant: str, mode: str, batch: int) -> dict:
    """Runs in a fresh interpreter: peak live tensor MiB and peak RSS growth (MiB) over one step."""
    from visionzoo.utils.memory import PeakLiveBytes

    model, x = _build(name, size, variant)
    x = x[:batch]
    _step(model, x[:1], "fwd")  # warm-up with one image (its smaller peak is overtaken below)
    if mode != "fwd":
        model.zero_grad(set_to_none=True)
    before = _rss_mib()
    _step(model, x, mode)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    if mode != "fwd":
        model.zero_grad(set_to_none=True)
    with PeakLiveBytes() as tracker:
        _step(model, x, mode)
    return dict(live=round(tracker.peak / 2 ** 20, 1), rss=round(rss, 1))


def measure_time(name: str, size: str, variant: str, mode: str, batch: int, calls: int) -> float:
    """Runs in a fresh interpreter: median seconds of ``calls`` steps after one warm-up step."""
    model, x = _build(name, size, variant)
    x = x[:batch]
    _step(model, x, mode)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        _step(model, x, mode)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _child(call: str, threads: int, **env_extra):
    """``call`` (an expression on this module) evaluated in a fresh interpreter with ``threads`` threads;
    its value comes back as the literal the child prints last."""
    code = (f"import sys, importlib.util; import torch; torch.set_num_threads({threads}); "
            f"spec = importlib.util.spec_from_file_location('bench_biformer_cpu', {__file__!r}); "
            f"b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); print(repr(b.{call}))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **env_extra)
    if OFFICIAL_DIR:
        env[OFFICIAL_DIR_ENV] = OFFICIAL_DIR
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"bench_biformer_cpu: child {call} failed:\n{out.stderr.strip()[-2000:]}")
    lines = out.stdout.strip().splitlines()
    for line in lines[:-1]:
        if line.startswith("# "):  # the child's notes (e.g. the upstream parity check)
            print(line, flush=True)
    return eval(lines[-1])


def _memory_subprocess(name, size, variant, mode, batch, threads) -> dict:
    return _child(f"measure_memory({name!r}, {size!r}, {variant!r}, {mode!r}, {batch})", threads,
                  MALLOC_MMAP_THRESHOLD_="65536")


def bench_models(args) -> list:
    rows = []
    for name in args.models:
        for size in args.sizes:
            for mode in args.modes:
                variants = [v for v in args.variants if not (v in ("official", "upstream") and mode != "fwd")]
                row = dict(model=name, size=size, mode=mode)
                if not args.memory_only and args.fresh:  # every round: each variant in a fresh process
                    times = {v: [] for v in variants}
                    for _ in range(args.rounds):
                        for v in variants:
                            times[v].append(_child(f"measure_time({name!r}, {size!r}, {v!r}, {mode!r}, "
                                                   f"{args.batch}, {args.calls})", args.threads))
                elif not args.memory_only:
                    models = {v: _build(name, size, v) for v in variants}
                    times = {v: [] for v in variants}
                    for v in variants:  # warm-up
                        _step(models[v][0], models[v][1][:args.batch], mode)
                    for _ in range(args.rounds):
                        for v in variants:
                            model, x = models[v]
                            t = time.perf_counter()
                            _step(model, x[:args.batch], mode)
                            times[v].append(time.perf_counter() - t)
                    del models
                if not args.memory_only:
                    row.update({f"{v}_s": round(statistics.median(times[v]), 3) for v in variants})
                    row.update({f"{v}_min_s": round(min(times[v]), 3) for v in variants})
                    if "auto" in variants:  # per-round ratios: the two runs of a round are adjacent in time
                        for v in variants:
                            if v != "auto":
                                r = [a / b for a, b in zip(times[v], times["auto"])]
                                row[f"{v}/auto_round_ratios"] = [round(x, 2) for x in r]
                                row[f"{v}/auto_median_ratio"] = round(statistics.median(r), 2)
                if args.memory or args.memory_only:
                    for v in variants:
                        mem = _memory_subprocess(name, size, v, mode, args.batch, args.threads)
                        row.update({f"{v}_{k}_mib": val for k, val in mem.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


OP_BACKENDS = ("reference", "auto")


def bench_op(args) -> None:
    from visionzoo.ops.routing_attention import bi_level_routing_attention as bra
    shapes = [  # (name, side, C, heads, n_win, topk): biformer_tiny's BRA stages
        ("224 s1", 56, 64, 2, 7, 1), ("224 s2", 28, 128, 4, 7, 4), ("224 s3", 14, 256, 8, 7, 16),
        ("448 s1", 112, 64, 2, 7, 1), ("448 s2", 56, 128, 4, 7, 4), ("448 s3", 28, 256, 8, 7, 16),
    ]
    for label, side, C, heads, n, k in shapes:
        qkv = torch.randn(args.batch, side, side, 3 * C, device=args.device)  # as the model: one projection
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        res = {}
        for mode in ("fwd", "fwd+bwd"):
            times = {b: [] for b in OP_BACKENDS}
            for _ in range(args.rounds + 1):
                for b in OP_BACKENDS:
                    leaves = qkv.clone().requires_grad_(mode != "fwd").split(C, dim=-1)
                    sync()
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.inference_mode():
                            bra(*leaves, heads, n, k, C ** -0.5, backend=b)
                    else:
                        bra(*leaves, heads, n, k, C ** -0.5, backend=b).sum().backward()
                    sync()
                    times[b].append(time.perf_counter() - t0)
            for b in OP_BACKENDS:
                res[f"{mode} {b} ms"] = round(1e3 * statistics.median(times[b][1:]), 1)
        print(json.dumps(dict(shape=label, **res)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["biformer_tiny", "biformer_small"])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true",
                   help="time every (round, variant) in a fresh process (one warm-up, median of --calls steps) "
                        "instead of round-robin in this process")
    p.add_argument("--calls", type=int, default=3, help="timed steps per fresh process (--fresh)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", action="store_true", help="skip the timing, measure memory only")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--official-dir", default=os.environ.get(OFFICIAL_DIR_ENV),
                   help=f"directory with the official BiFormer code (models/, ops/) for the 'upstream' variant "
                        f"(default ${OFFICIAL_DIR_ENV})")
    p.add_argument("--op", action="store_true", help="benchmark the BRA op alone instead of the models")
    p.add_argument("--device", default="cpu", help="device for --op (e.g. cuda; the models always run on CPU)")
    args = p.parse_args()
    global OFFICIAL_DIR
    OFFICIAL_DIR = args.official_dir
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, batch {args.batch}", flush=True)
    if args.op:
        bench_op(args)
    else:
        bench_models(args)


if __name__ == "__main__":
    main()
