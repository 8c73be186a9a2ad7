"""Compile every Triton kernel of visionzoo for A100 (sm_80) and H100 (sm_90) without a GPU.

Each registered model that has a Triton kernel (every Vim, BiFormer, OverLoCK and Sparsifiner variant)
is run forward and backward at batch 1 on the CPU with every op forced to its ``triton`` backend, inside
``visionzoo.ops._triton_build.compile_only``: each kernel launch is compiled ahead of time with Triton's
bundled ptxas instead of run, with exactly the arguments, constexprs and specialisation (alignment,
unit strides) the model's launch has. Models run in fp32 and in bf16; every bf16 launch is compiled
once more with fp16 tensors (same layouts; no launcher decides by the difference), and BiFormer's fp32
runs once more with ``torch.backends.cuda.matmul.allow_tf32`` (its kernels pick the dot precision by it),
Sparsifiner's runs once more per non-default tile of ``sparse_attention._triton.TILE_CONFIGS`` (the tiles the
GPU benchmark sweeps; none of the kernels uses ``triton.autotune``).

Must run where ``TRITON_INTERPRET`` is not set. Prints one line per compiled (kernel, specialisation,
dtype, target) and the count; exits 1 when any compile fails or needs more shared memory than the target
has (A100 163 KiB, H100 227 KiB per block). ``--md PATH`` writes the resource table.

    env -u TRITON_INTERPRET python benchmarks/gpu_compile.py --md benchmarks/gpu_compile.md   # full
    env -u TRITON_INTERPRET python benchmarks/gpu_compile.py --quick     # first launch per kernel, bf16 (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

# Before torch / visionzoo (and Triton) are imported.
if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
    sys.exit("gpu_compile: run without TRITON_INTERPRET=1 (e.g. `env -u TRITON_INTERPRET python ...`)")
for _op in ("SELECTIVE_SCAN", "ROUTING_ATTENTION", "NEIGHBORHOOD_AGGREGATION", "SPARSE_ATTENTION"):
    os.environ[f"VISIONZOO_BACKEND_{_op}"] = "triton"

import timm  # noqa: E402
import torch  # noqa: E402

import visionzoo  # noqa: E402,F401  (registers the models)
from visionzoo.ops import _triton_build  # noqa: E402

# (model, image size): every registered variant whose ops have Triton kernels.
MODELS = [
    ("vim_tiny", 224), ("vim_small", 224), ("vim_base", 224), ("vim_tiny_stride8", 224), ("vim_small_stride8", 224),
    ("biformer_tiny", 224), ("biformer_small", 224), ("biformer_base", 224), ("biformer_stl", 224),
    ("overlock_xt", 224), ("overlock_t", 224), ("overlock_s", 224), ("overlock_b", 224),
    ("sparsifiner_deit_small", 224), ("sparsifiner_deit_small", 384),
    ("sparsifiner_lvvit_small", 224), ("sparsifiner_lvvit_small", 384),
]
# --quick: the smallest variant of each family in bf16, the first launch of each kernel.
QUICK = [("vim_tiny", 224), ("biformer_tiny", 224), ("overlock_xt", 224), ("sparsifiner_deit_small", 224)]

# The Triton kernels of visionzoo: the check fails if a run leaves one of them uncompiled.
KERNELS = ("selective_scan_fwd_kernel", "selective_scan_bwd_kernel", "bra_fwd_kernel", "bra_bwd_dq_kernel",
           "bra_bwd_dkdv_kernel", "na2d_av_fwd_kernel", "na2d_av_bwd_attn_kernel", "na2d_av_bwd_value_kernel",
           "sparse_attn_fwd_kernel", "sparse_attn_bwd_kernel")


def drive(session, name: str, size: int, dtype: torch.dtype, tf32: bool = False) -> None:
    """One forward and backward of ``name`` at batch 1 in ``dtype``; launches are compiled by ``session``."""
    kwargs = {"img_size": size} if size != 224 else {}
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(dtype).train()
    session.label = f"{name}@{size} {str(dtype).replace('torch.', '')}{' tf32' if tf32 else ''}"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        out = model(torch.randn(1, 3, size, size, dtype=dtype))
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def run(models, dtypes, per_kernel=None, log=print):
    from visionzoo.ops.sparse_attention import triton_tiles
    from visionzoo.ops.sparse_attention import TILE_CONFIGS

    start = time.time()
    with _triton_build.compile_only((80, 90), substitute={torch.bfloat16: torch.float16},
                                    per_kernel=per_kernel) as session:
        for name, size in models:
            for dtype in dtypes:
                t0, n0 = time.time(), len(session.records)
                drive(session, name, size, dtype)
                if dtype == torch.float32 and name.startswith("biformer"):
                    drive(session, name, size, dtype, tf32=True)
                if name.startswith("sparsifiner") and per_kernel is None:  # the tiles the GPU benchmark sweeps
                    default = triton_tiles()
                    try:
                        for tiles in TILE_CONFIGS[1:]:
                            triton_tiles(*tiles)
                            drive(session, name, size, dtype)
                    finally:
                        triton_tiles(*default)
                log(f"# {name}@{size} {dtype}: {len(session.records) - n0} new compiles, {time.time() - t0:.0f} s")
    return session, time.time() - start


MARKER = "<!-- generated above; written by hand below (kept when the file is regenerated) -->"


def kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def markdown(records, seconds: float, command: str) -> str:
    by_kernel = defaultdict(list)
    for r in records:
        by_kernel[r.kernel].append(r)
    lines = [
        "# Triton kernels compiled for A100 (sm_80) and H100 (sm_90) without a GPU",
        "",
        f"Generated by `{command}` (Triton {__import__('triton').__version__}, torch {torch.__version__}; "
        f"{seconds:.0f} s on this machine's CPU). Every registered Vim, BiFormer, OverLoCK and Sparsifiner variant "
        "ran forward and backward at batch 1 on the CPU with each op forced to its `triton` backend, and every "
        "kernel launch was compiled ahead of time (`visionzoo.ops._triton_build.compile_only`) with the launch's "
        "own arguments, constexprs and specialisation: fp32 and bf16 model runs, each bf16 launch again with fp16 "
        "tensors, BiFormer's fp32 runs again with TF32 dots allowed. None of these kernels has autotune configs; "
        "the launchers choose one configuration per shape, so a row below is one (kernel, configuration, dtype).",
        "",
        f"**{len(records)} compiles (kernel, configuration, dtype, target), "
        f"{sum(not r.ok for r in records)} failures.** Registers and spills are ptxas' `-v` report, shared memory "
        "Triton's dynamic shared memory per block (the check fails above 163 KiB on sm_80, 227 KiB on sm_90).",
        "",
    ]
    for kernel in KERNELS:
        rows = by_kernel.get(kernel, [])
        lines += [f"## {kernel}", "", "| target | dtypes | constexprs | warps | regs | spill st/ld B | smem KiB | first seen in |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r.target, r.dtypes, str(r.constexprs))):
            const = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
            status = "" if r.ok else f" **FAILED: {r.error or 'shared memory over the limit'}**"
            lines.append(f"| {r.target} | {r.dtypes} | {const} | {r.num_warps} | {r.registers} | "
                         f"{r.spill_stores}/{r.spill_loads} | {kib(r.shared)} | {r.case}{status} |")
        lines.append("")
    spills = [r for r in records if r.spill_stores]
    lines += ["## Spills", ""]
    if spills:
        lines += [f"{len(spills)} compiles spill registers:", ""]
        for r in spills:
            lines.append(f"- {r.kernel} {r.target} {r.dtypes} ({r.case}): {r.spill_stores} B stored / "
                         f"{r.spill_loads} B loaded, {r.registers} registers")
    else:
        lines.append("No compile spills registers (0 bytes spill stores and loads everywhere).")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest variant per family, bf16, the first launch of each kernel (CI)")
    ap.add_argument("--md", help="write the resource table (markdown) here")
    args = ap.parse_args(argv)
    if args.quick:
        session, seconds = run(QUICK, (torch.bfloat16,), per_kernel=1)
    else:
        session, seconds = run(MODELS, (torch.float32, torch.bfloat16))
    records = session.records
    for r in records:
        const = ",".join(f"{k}={v}" for k, v in r.constexprs.items())
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.kernel} {r.target} {r.dtypes} regs={r.registers} "
              f"spills={r.spill_stores}/{r.spill_loads} smem={r.shared} [{const}] {r.error}")
    missing = [k for k in KERNELS if not any(r.kernel == k for r in records)]
    failed = [r for r in records if not r.ok]
    print(f"compiled {len(records)} (kernel, configuration, dtype, target) cases from {session.launches} launches "
          f"in {seconds:.0f} s: {len(records) - len(failed)} ok, {len(failed)} failed; kernels never launched: "
          f"{', '.join(missing) or 'none'}")
    if args.md:
        cmd = "env -u TRITON_INTERPRET python benchmarks/gpu_compile.py" + (" --quick" if args.quick else "") + \
            f" --md {args.md}"
        text = markdown(records, seconds, cmd)
        # The hand-written part (the CUDA auto order, what the spills mean) below the marker is kept.
        kept = open(args.md).read().partition(MARKER)[2] if os.path.exists(args.md) else ""
        text += "\n" + MARKER + (kept or "\n")
        tmp = args.md + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.md)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
