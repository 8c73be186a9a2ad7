#!/usr/bin/env python
"""Benchmark visionzoo and timm models: images/s, step time, peak memory, params, GMACs.

    python tools/benchmark.py --model vim_tiny --img-size 224 1024
    python tools/benchmark.py --models 'vim_*' deit_small_patch16_224 convnext_tiny --mode both \\
        --device cuda --precision bf16 --channels-last --batch-size 64 --warmup 10 --reps 40
    python tools/benchmark.py --replot benchmarks/results/<file>.json   # redraw a PNG

Protocol (as timm's ``benchmark.py``): for each model, resolution and mode the model is built
with random weights, ``--warmup`` untimed steps run (they also absorb ``torch.compile``), then
``--reps`` timed steps, each closed by ``torch.cuda.synchronize()`` on CUDA; the step time is
the median over the reps (the minimum is recorded too). ``infer`` steps are a forward pass under
``torch.inference_mode``; ``train`` steps are forward + cross-entropy + backward + SGD
(momentum 0.9) step. When a step runs out of memory the batch is halved and the measurement
restarted, down to batch 1; the row records the batch actually used.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights, inputs,
optimizer state, activations and the allocator's rounding). On the CPU, which has no allocator
statistics, one extra eager step runs under ``visionzoo.utils.memory.PeakLiveBytes`` (tensor
storages created in the step, peak of live bytes) and the bytes already resident (weights,
buffers, optimizer state, input) are added, so both report the peak of tensor memory in use.

Parameters and GMACs (per image, batch 1) are counted on the meta device with
``visionzoo.utils.count_macs``, which counts visionzoo's custom ops through their FLOP formulas.
Models are built with ``img_size=<resolution>`` when their constructor takes it (ViTs, Vim, Swin,
BiFormer, ...); CNNs without that argument take any input as built. ``--fixed-size`` builds every
model at its default size instead, so fixed-size models report an error row at other sizes.
A resolution a model cannot take gives a row with the error message, never a crash.

Results: printed as a table and, unless ``--no-save``, written to ``--out-dir`` (default
benchmarks/results/) as CSV (``#`` header lines: command, hardware, versions, settings, load
average) and JSON, file names carrying mode, precision, layout, batch, threads, torch version,
device and hardware, plus a PNG: images/s and peak memory against resolution, and paper top-1
against GMACs (paper numbers: visionzoo's registry; baselines: ``BASELINE_TOP1`` below).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import visionzoo
from visionzoo.cli import REPO as ROOT
from visionzoo.export import runtime_runner
from visionzoo.models import VISIONZOO_MODELS
from visionzoo.utils import count_macs, count_params
from visionzoo.utils.memory import PeakLiveBytes

# ImageNet-1k top-1 (224x224 unless noted) of common timm baselines, as their papers report them.
# visionzoo's own numbers live in visionzoo/models/_registry.py (``paper_top1``).
BASELINE_TOP1 = {
    # DeiT (Touvron et al., ICML 2021), Table 1, without distillation.
    "deit_tiny_patch16_224": 72.2, "deit_small_patch16_224": 79.8, "deit_base_patch16_224": 81.8,
    # Swin (Liu et al., ICCV 2021), Table 1a, ImageNet-1k training.
    "swin_tiny_patch4_window7_224": 81.3, "swin_small_patch4_window7_224": 83.0,
    "swin_base_patch4_window7_224": 83.5,
    # ConvNeXt (Liu et al., CVPR 2022), Table 1, ImageNet-1k training.
    "convnext_tiny": 82.1, "convnext_small": 83.1, "convnext_base": 83.8,
    # FasterNet (Chen et al., CVPR 2023), Table 3.
    "fasternet_t0": 71.9, "fasternet_t1": 76.2, "fasternet_t2": 78.9, "fasternet_s": 81.3,
    "fasternet_m": 83.0, "fasternet_l": 83.5,
    # EfficientViM (Lee et al., CVPR 2025), official README, 300 epochs, no distillation (M4 at 256).
    "efficientvim_m1": 72.9, "efficientvim_m2": 75.4, "efficientvim_m3": 77.6, "efficientvim_m4": 79.4,
}

CSV_FIELDS = [
    "model", "source", "mode", "img_size", "built_img_size", "batch_size", "requested_batch_size",
    "precision", "channels_last", "compile", "runtime", "device", "threads", "params", "gmacs",
    "step_ms", "step_ms_min", "img_per_s", "peak_mem_mb", "memory_method", "paper_top1", "error",
]


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", "--model", dest="models", nargs="+", default=["*"],
                   help="model names or globs: visionzoo models first, else timm's (default: every "
                        "visionzoo model except the test_* ones)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="one or more square resolutions")
    p.add_argument("--mode", choices=("infer", "train", "both"), default="infer")
    p.add_argument("--batch-size", type=int, default=1, help="starting batch; halved on out-of-memory")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or torch.autocast to bf16 / fp16 (fp16 training uses a GradScaler)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up compiles)")
    p.add_argument("--runtime", choices=("eager", "onnxruntime", "export"), default="eager",
                   help="run the model in eager PyTorch, as an ONNX file in onnxruntime (CPU, torch's thread count) "
                        "or as its torch.export program (visionzoo.export; fp32 CPU inference only)")
    p.add_argument("--fixed-size", action="store_true",
                   help="build every model at its default size instead of passing img_size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--reps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--max-timed-params", type=float, default=None,
                   help="time only models with at most this many parameters at the given size (others: "
                        "params and GMACs only); default 30e6 on the CPU, no limit on CUDA")
    p.add_argument("--out-dir", type=str, default=str(ROOT / "benchmarks" / "results"),
                   help="where CSV, JSON and PNG go (names from hardware, versions and settings)")
    p.add_argument("--csv", type=str, default=None,
                   help="write the CSV to this path instead; JSON and PNG go next to it with its stem")
    p.add_argument("--tag", type=str, default="", help="appended to the automatic file name")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--no-plot", action="store_true", help="write CSV and JSON but no PNG")
    p.add_argument("--traceback", action="store_true", help="print the traceback of every error row")
    p.add_argument("--replot", type=str, default=None, metavar="JSON",
                   help="only redraw the PNG of a results JSON written by this tool")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--batch-size and --reps must be >= 1 and --warmup >= 0")
    if any(s < 1 for s in args.img_size):
        p.error("--img-size values must be positive")
    if args.max_timed_params is None:
        args.max_timed_params = 30e6 if torch.device(args.device).type == "cpu" else math.inf
    return args


def resolve_models(patterns):
    """Visionzoo names matching each glob; a pattern matching none is looked up in timm."""
    zoo = visionzoo.list_models()
    names = []
    for pat in patterns:
        matched = [n for n in zoo if fnmatch.fnmatch(n, pat)]
        if not pat.startswith("test_"):
            matched = [n for n in matched if not n.startswith("test_")] or matched
        if not matched:
            matched = timm.list_models(pat)
        if not matched:
            raise SystemExit(f"benchmark: no visionzoo or timm model matches {pat!r}")
        names.extend(n for n in matched if n not in names)
    return names


# ---------------------------------------------------------------------------------------------
# machine description


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def file_stem(args, hw: str, threads: int) -> str:
    parts = [
        f"{args.mode}", args.precision, "nhwc" if args.channels_last else "nchw",
        *(["compile"] if args.compile else []), *(["fixed"] if args.fixed_size else []),
        f"bs{args.batch_size}", f"th{threads}", f"pt{torch.__version__.split('+')[0]}",
        torch.device(args.device).type, _slug(hw), *([_slug(args.tag)] if args.tag else []),
    ]
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# measurement


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def with_oom_backoff(measure, batch_size: int, on_retry=None):
    """Run ``measure(batch)``; on out-of-memory halve the batch and retry. Returns (result, batch).

    ``on_retry(new_batch)`` runs after the failed attempt's exception (and the frames holding its
    tensors) is released, so it can free cached memory before the next try.
    """
    while True:
        try:
            return measure(batch_size), batch_size
        except Exception as exc:
            if not is_oom(exc) or batch_size == 1:
                raise
        batch_size //= 2
        if on_retry is not None:
            on_retry(batch_size)


def _error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def build_model(name: str, img_size: int, fixed_size: bool, device):
    """``timm.create_model`` at ``img_size`` when the constructor takes it. Returns (model, built size)."""
    with torch.device(device):
        if not fixed_size:
            try:
                return timm.create_model(name, img_size=img_size), img_size
            except TypeError as exc:
                if "img_size" not in str(exc):
                    raise
        model = timm.create_model(name)
    default = model.pretrained_cfg.get("input_size", (3, None, None))[-1]
    return model, default


def _resident_tensors(model, optimizer, x) -> list:
    """Tensors alive before a step: weights, buffers, optimizer state and the input."""
    tensors = [*model.parameters(), *model.buffers(), x]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def cpu_step_peak_bytes(step, resident) -> int:
    """Peak tensor bytes of one ``step()``: the resident tensors plus the peak of new storages.

    ``PeakLiveBytes`` counts the storage of any tensor an op returns that it has not seen, which
    includes views of tensors made before the region (``aten.t`` of a Linear weight under no_grad
    returns a view sharing the weight's storage): those would count the weights twice. Marking the
    resident storages as seen (zero bytes) before entering leaves only new storages counted.
    """
    storages = {id(s): s for s in (t.untyped_storage() for t in resident)}  # kept alive: stable ids
    tracker = PeakLiveBytes()
    tracker._live.update(dict.fromkeys(storages, 0))
    with tracker:
        step()
    return sum(s.nbytes() for s in storages.values()) + tracker.peak


def measure_one(name, img_size, batch_size, mode, args, device):
    """Time one (model, resolution, mode, batch). Returns a dict of measured fields."""
    torch.manual_seed(0)
    model, built = build_model(name, img_size, args.fixed_size, device)
    model.train(mode == "train")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    eager = model
    run_model = torch.compile(model) if args.compile else model
    if args.runtime != "eager":
        if mode == "train" or device.type != "cpu" or args.compile or args.precision != "fp32" or args.channels_last:
            raise ValueError(f"--runtime {args.runtime} times fp32 CPU inference only (no --compile / --channels-last)")
        run_model = runtime_runner(model.eval(), args.runtime, img_size)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    cuda = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    optimizer = scaler = None
    if mode == "train":
        target = torch.randint(0, getattr(model, "num_classes", 1000) or 1000, (batch_size,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

        def step(net=run_model, no_grad=None):
            with autocast():
                out = net(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = F.cross_entropy(out.float(), target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    else:
        # the memory pass uses no_grad: under inference_mode a TorchDispatchMode sees composite ops
        # (einsum) decomposed below autocast, which then mixes dtypes
        def step(net=run_model, no_grad=torch.inference_mode):
            with no_grad(), autocast():
                net(x)

    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    elif args.runtime != "eager":
        peak, method = None, f"not measured ({args.runtime})"
    else:
        peak = cpu_step_peak_bytes(lambda: step(eager, no_grad=torch.no_grad),
                                   _resident_tensors(model, optimizer, x))
        method = "resident+PeakLiveBytes(eager)"
    median = statistics.median(times)
    return {"built_img_size": built, "step_ms": median * 1e3, "step_ms_min": min(times) * 1e3,
            "img_per_s": batch_size / median, "peak_mem_mb": None if peak is None else peak / 2**20, "memory_method": method}


def count_model(name, img_size, fixed_size, row):
    """Fill ``row["params"]`` and ``row["gmacs"]`` (meta device); params stay when the forward fails."""
    with torch.device("meta"):
        model, _built = build_model(name, img_size, fixed_size, "meta")
    row["params"] = count_params(model)
    row["gmacs"] = count_macs(model, (1, 3, img_size, img_size)) / 1e9


def paper_top1(name):
    meta = VISIONZOO_MODELS.get(name)
    return meta.paper_top1 if meta is not None else BASELINE_TOP1.get(name)


def default_size_info(name):
    """Params, default input size and GMACs there (the size the paper's top-1 refers to)."""
    with torch.device("meta"):
        model = timm.create_model(name)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return {"source": "visionzoo" if name in VISIONZOO_MODELS else "timm",
            "family": VISIONZOO_MODELS[name].family if name in VISIONZOO_MODELS else name.split("_")[0],
            "params": count_params(model), "default_img_size": size[-1],
            "gmacs_at_default": count_macs(model, (1, *size)) / 1e9, "paper_top1": paper_top1(name)}


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(names, args, device, log=print):
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    rows = []
    threads = torch.get_num_threads()
    for name in names:
        for img_size in args.img_size:
            base = {"model": name, "source": "visionzoo" if name in VISIONZOO_MODELS else "timm",
                    "img_size": img_size, "built_img_size": None, "requested_batch_size": args.batch_size,
                    "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
                    "runtime": args.runtime,
                    "device": str(device), "threads": threads, "params": None, "gmacs": None, "step_ms": None,
                    "step_ms_min": None, "img_per_s": None, "peak_mem_mb": None, "memory_method": None,
                    "paper_top1": paper_top1(name), "error": ""}
            try:
                count_model(name, img_size, args.fixed_size, base)
                count_error = ""
            except Exception as exc:  # noqa: BLE001  (a size the model cannot take is a row, not a crash)
                count_error = _error_text(exc)
                if args.traceback:
                    traceback.print_exc()
            for mode in modes:
                row = dict(base, mode=mode, batch_size=args.batch_size, error=count_error)
                if not count_error and base["params"] <= args.max_timed_params:
                    try:
                        what = f"{name} @{img_size} {mode}"

                        def measure(bs, name=name, img_size=img_size, mode=mode):
                            return measure_one(name, img_size, bs, mode, args, device)

                        def on_retry(bs, what=what):
                            _cleanup(device)
                            log(f"  {what}: out of memory, batch -> {bs}")

                        result, used = with_oom_backoff(measure, args.batch_size, on_retry)
                        row.update(result, batch_size=used)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = _error_text(exc)
                        if args.traceback:
                            traceback.print_exc()
                elif not count_error:
                    row["error"] = f"not timed: {base['params']:,} params > --max-timed-params"
                _cleanup(device)
                rows.append({k: row.get(k) for k in CSV_FIELDS})
                log(format_row(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------------------
# output


def _fmt(v, spec):
    if v is None:
        width = re.match(r"\d*", spec).group()
        return "-".rjust(int(width) if width else 1)
    return format(v, spec)


TABLE_HEADER = (f"{'model':30s} {'mode':5s} {'size':>5s} {'bs':>4s} {'params':>12s} {'GMACs':>8s} "
                f"{'ms/step':>9s} {'img/s':>9s} {'peak MB':>9s}  error")


def format_row(r):
    label = r["model"] if r.get("runtime", "eager") == "eager" else f"{r['model']} [{r['runtime']}]"
    return (f"{label:30s} {r['mode']:5s} {r['img_size']:5d} {_fmt(r['batch_size'], '4d')} "
            f"{_fmt(r['params'], '12,d')} {_fmt(r['gmacs'], '8.3f')} {_fmt(r['step_ms'], '9.1f')} "
            f"{_fmt(r['img_per_s'], '9.4g')} {_fmt(r['peak_mem_mb'], '9.1f')}  {r['error'] or ''}")


def run_metadata(args, argv, device, hw, threads):
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "command": "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hardware": hw, "device": str(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None, "timm": timm.__version__,
        "visionzoo": visionzoo.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "settings": {"mode": args.mode, "img_sizes": args.img_size, "batch_size": args.batch_size,
                     "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
                     "runtime": args.runtime,
                     "fixed_size": args.fixed_size, "warmup": args.warmup, "reps": args.reps,
                     "statistic": "median of reps"},
        "load_average_start": list(load) if load else None,
    }


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def write_results(rows, meta, models, csv_path: Path):
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        f.write(f"# command: {meta['command']}\n")
        f.write(f"# date {meta['date_utc']}; hardware {meta['hardware']} ({meta['device']}); cpu {meta['cpu']}, "
                f"{meta['cpu_count']} cores, {meta['threads']} torch threads, OMP_NUM_THREADS={meta['omp_num_threads']}\n")
        f.write(f"# torch {meta['torch']} (cuda {meta['cuda']}), timm {meta['timm']}, visionzoo {meta['visionzoo']}, "
                f"python {meta['python']}, {meta['platform']}\n")
        f.write(f"# settings {json.dumps(meta['settings'])}; load average at start {meta['load_average_start']}, "
                f"at end {meta.get('load_average_end')}\n")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows([{k: _round(v) for k, v in r.items()} for r in rows])
    json_path = csv_path.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "models": models, "rows": rows}, indent=1) + "\n")
    return csv_path, json_path


def plot_results(results: dict, png_path: Path) -> Path:
    """Throughput and peak memory against resolution; paper top-1 against GMACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows, models, meta = results["rows"], results["models"], results["meta"]
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in rows)] or ["infer"]
    sizes = sorted({r["img_size"] for r in rows})
    fig, grid = plt.subplots(2, 2, figsize=(14, 11))
    grid = list(grid.flat)
    *speed_axes, mem_ax, acc_ax = grid[:len(modes) + 2]
    cmap = plt.get_cmap("tab20")
    colors = {name: cmap(i % 20) for i, name in enumerate(models)}

    def style(name):
        zoo = models[name]["source"] == "visionzoo"
        return {"color": colors[name], "marker": "o" if zoo else "s", "linestyle": "-" if zoo else "--"}

    def series(name, mode, key):
        return sorted((r["img_size"], r[key]) for r in rows
                      if r["model"] == name and r["mode"] == mode and r[key] is not None and not r["error"])

    for ax, mode in zip(speed_axes, modes):
        for name in models:
            pts = series(name, mode, "img_per_s")
            if pts:
                ax.plot(*zip(*pts), **style(name))
        ax.set(title=f"{mode} throughput (median step)", ylabel="images / s", yscale="log")
    for name in models:
        for mode in modes:
            pts = series(name, mode, "peak_mem_mb")
            if pts:
                st = style(name)
                if mode == "train":
                    st.update(linestyle=":", alpha=0.6)
                mem_ax.plot(*zip(*pts), **st)
    mem_ax.set(title="peak tensor memory" + (" (train dotted)" if len(modes) == 2 else ""), ylabel="MiB",
               yscale="log")
    for ax in (*speed_axes, mem_ax):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("resolution (px, square)")
        ax.grid(True, alpha=0.3)
    missing = []
    for name, info in models.items():
        if info.get("paper_top1") is None or info.get("gmacs_at_default") is None:
            missing.append(name)
            continue
        st = style(name)
        acc_ax.scatter(info["gmacs_at_default"], info["paper_top1"], color=st["color"], marker=st["marker"], s=45)
        acc_ax.annotate(name, (info["gmacs_at_default"], info["paper_top1"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    acc_ax.set(title="paper ImageNet-1k top-1 vs GMACs at the model's default size", xlabel="GMACs",
               ylabel="top-1 (%)")
    acc_ax.grid(True, alpha=0.3)
    if missing:
        acc_ax.text(0.01, 0.01, "no paper top-1 recorded:\n" + "\n".join(missing), transform=acc_ax.transAxes,
                    fontsize=7, va="bottom")
    handles = [Line2D([], [], label=f"{name} ({models[name]['source']})", **style(name)) for name in models]
    errors = sorted({f"{r['model']} @{r['img_size']} {r['mode']}" for r in rows if r["error"]})
    if len(grid) > len(modes) + 2:
        legend_ax = grid[-1]
        legend_ax.axis("off")
        legend_ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=1 + len(handles) // 22, frameon=False)
        if errors:
            legend_ax.text(0.55, 1.0, "no measurement (see CSV error column):\n" + "\n".join(errors[:30]),
                           transform=legend_ax.transAxes, fontsize=7, va="top")
        bottom = 0.0
    else:
        fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
        bottom = 0.03 * math.ceil(len(handles) / 4)
    s = meta["settings"]
    fig.suptitle(f"{meta['hardware']} ({meta['device']}, {meta['threads']} threads), torch {meta['torch']}, "
                 f"{s['precision']}{', channels_last' if s['channels_last'] else ''}"
                 f"{', compile' if s['compile'] else ''}, batch {s['batch_size']}, median of {s['reps']}, "
                 f"{meta['date_utc']}", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        print(plot_results(json.loads(path.read_text()), path.with_suffix(".png")))
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda given but CUDA is not available")
    threads = torch.get_num_threads()
    hw = hardware_name(device)
    names = resolve_models(args.models)
    meta = run_metadata(args, argv, device, hw, threads)
    print(f"# {hw} ({device}), torch {torch.__version__}, {threads} threads, {args.precision}"
          f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}, "
          f"batch {args.batch_size}, sizes {args.img_size}, load average {meta['load_average_start']}")
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    rows = benchmark(names, args, device)
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.no_save:
        return rows
    models = {}
    for name in names:
        try:
            models[name] = default_size_info(name)
        except Exception as exc:  # noqa: BLE001
            models[name] = {"source": "visionzoo" if name in VISIONZOO_MODELS else "timm", "family": None,
                            "params": None, "default_img_size": None, "gmacs_at_default": None,
                            "paper_top1": paper_top1(name), "error": _error_text(exc)}
    csv_path = Path(args.csv) if args.csv else Path(args.out_dir) / f"{file_stem(args, hw, threads)}.csv"
    written = write_results(rows, meta, models, csv_path)
    if not args.no_plot:
        try:
            written += (plot_results({"meta": meta, "models": models, "rows": rows}, csv_path.with_suffix(".png")),)
        except ImportError as exc:
            print(f"benchmark: no PNG ({exc}); pip install matplotlib (in the `train` extra)")
    for path in written:
        print(f"wrote {path}")
    return rows


def cli() -> None:  # visionzoo-benchmark: a console script would pass main's rows to sys.exit
    main()
