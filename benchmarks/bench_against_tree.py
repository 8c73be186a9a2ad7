"""Median CPU inference time of one model from a given source tree (for before/after comparisons).

    git archive <rev> | tar -x -C /tmp/vz_old      # the tree to compare against
    for r in 1 2 3; do for tree in /tmp/vz_old .; do
        OMP_NUM_THREADS=1 python benchmarks/bench_against_tree.py $tree biformer_tiny 224; done; done

Each call is a fresh process that imports visionzoo from ``TREE`` (put first on ``sys.path``), builds
``MODEL`` with random weights at ``SIZE``, warms up twice and prints the median of five batch-1
``inference_mode`` calls on ``--threads`` threads (default 1). Alternate the trees in a loop, as above,
so both see the same machine load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="source tree holding the visionzoo package to import")
    parser.add_argument("model")
    parser.add_argument("size", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (args.tree / "visionzoo" / "__init__.py").is_file():
        parser.error(f"{args.tree} holds no visionzoo package")
    sys.path.insert(0, str(args.tree.resolve()))
    import timm
    import torch

    import visionzoo  # noqa: F401  (registers the models; from TREE)

    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, img_size=args.size).eval()
    x = torch.randn(1, 3, args.size, args.size)
    with torch.inference_mode():
        model(x)
        model(x)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    print(f"{args.tree} {args.model} {args.size} {args.threads}t {statistics.median(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
