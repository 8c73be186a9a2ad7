"""One model's CPU time under two source trees, fresh processes alternating (A/B of a change).

    git archive <rev> | tar -x -C /tmp/base
    python benchmarks/ab_trees.py /tmp/base . [--model vim_tiny] [--size 224] [--threads 1 2] [--rounds 5]
        [--calls 15] [--train BATCH]

Each measurement is a new process with ``PYTHONPATH`` at the tree (so that tree's ``visionzoo`` is imported,
not the installed one; the script checks), ``torch.set_num_threads(n)``, random weights, fp32: batch 1 under
``inference_mode``, or with ``--train BATCH`` a training step of that batch (forward, cross-entropy, backward,
SGD step); three warm-up calls (one for training), then the median of ``--calls``. Rounds go tree by tree
within each thread count, so both trees see the same machine load; the table gives the median over rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r'''
import sys, time, torch, timm, visionzoo
assert visionzoo.__file__.startswith(sys.argv[4]), visionzoo.__file__
torch.set_num_threads(int(sys.argv[1]))
batch = int(sys.argv[6])
m = timm.create_model(sys.argv[2]).train(batch > 0)
x = torch.randn(max(batch, 1), 3, int(sys.argv[3]), int(sys.argv[3]))
if batch:
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)

    def call():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
else:
    def call():
        with torch.inference_mode():
            m(x)
for _ in range(1 if batch else 3):
    call()
ts = []
for _ in range(int(sys.argv[5])):
    s = time.perf_counter(); call(); ts.append(time.perf_counter() - s)
print(sorted(ts)[len(ts) // 2] * 1e3)
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs=2, type=Path)
    p.add_argument("--model", default="vim_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--train", type=int, default=0, metavar="BATCH", help="time a training step of this batch")
    args = p.parse_args()
    trees = [t.resolve() for t in args.trees]
    times: dict = {}
    for _ in range(args.rounds):
        for n in args.threads:
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(n))
                res = subprocess.run([sys.executable, "-c", WORKER, str(n), args.model, str(args.size), str(tree),
                                      str(args.calls), str(args.train)], env=env, capture_output=True, text=True,
                                     cwd="/")
                if res.returncode:
                    sys.exit(f"ab_trees: {tree}: {res.stderr.strip().splitlines()[-1]}")
                times.setdefault((str(tree), n), []).append(float(res.stdout.split()[-1]))
    what = f"training step, batch {args.train}" if args.train else "inference, batch 1"
    print(f"{args.model}, {args.size}, {what}, fp32; median over {args.rounds} rounds of the median of "
          f"{args.calls} calls, ms\n")
    print("| tree | " + " | ".join(f"{n} thread(s)" for n in args.threads) + " | speed-up |")
    print("|---|" + "---:|" * (len(args.threads) + 1))
    for tree in trees:
        med = [statistics.median(times[(str(tree), n)]) for n in args.threads]
        print(f"| {tree} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {med[0] / med[-1]:.2f}x |")


if __name__ == "__main__":
    main()
