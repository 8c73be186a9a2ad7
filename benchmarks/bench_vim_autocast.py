"""vim_tiny CPU inference at 224 on one thread: fp32 vs bf16 autocast (and, with ``--tree``, another
checkout's fp32 for a before/after check). Each measurement runs in a fresh process; the modes
alternate round-robin so machine noise hits all of them alike. Prints the median of the per-round
medians per mode.

    python benchmarks/bench_vim_autocast.py --rounds 5 [--tree /path/to/other/checkout]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import timm, visionzoo
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model("vim_tiny").eval()
x = torch.randn(1, 3, 224, 224)
autocast = sys.argv[2] == "bf16"
times = []
with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
    for i in range(int(sys.argv[3]) + 2):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
print(json.dumps(sorted(times[2:])[len(times[2:]) // 2]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tree", default=None, help="another checkout to time in fp32 (before/after)")
    args = ap.parse_args()
    modes = [("fp32", str(ROOT)), ("bf16-autocast", str(ROOT))]
    if args.tree:
        modes.append(("fp32 (--tree)", args.tree))
    res = {m: [] for m, _ in modes}
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    for r in range(args.rounds):
        for mode, tree in modes:
            out = subprocess.run([sys.executable, "-c", WORKER, tree, "bf16" if "bf16" in mode else "fp32",
                                  str(args.reps)], capture_output=True, text=True, env=env, cwd="/tmp", check=True)
            res[mode].append(json.loads(out.stdout.strip().splitlines()[-1]) * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{m} {v[-1]:.1f} ms" for m, v in res.items()), flush=True)
    med = {m: statistics.median(v) for m, v in res.items()}
    print("| mode | median ms (1 thread, 224) | vs fp32 |\n|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v:.1f} | {v / med['fp32']:.2f}x |")


if __name__ == "__main__":
    main()
