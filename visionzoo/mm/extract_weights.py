"""Write a tensors-only copy of a checkpoint that pickles Python objects (e.g. one saved by mmengine).

    python -m visionzoo.mm.extract_weights --trust IN.pth OUT.pth

Reading IN.pth unpickles arbitrary objects, which can run code: ``--trust`` says that you trust the
file. OUT.pth holds ``{"state_dict": {name: tensor}}`` (the model weights only) and loads with
``torch.load(weights_only=True)``, so ``visionzoo.Backbone``'s ``init_cfg`` can read it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..models._loading import select_state_dict


def extract(src: str, dst: str) -> int:
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)  # the caller vouched for the file
    state_dict = select_state_dict(checkpoint) if isinstance(checkpoint, dict) else {}
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SystemExit(f"{src}: no tensors found under 'state_dict' / 'model' / 'module' or at the top level")
    tmp = dst + ".tmp"
    torch.save({"state_dict": tensors}, tmp)
    os.replace(tmp, dst)
    return len(tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--trust", action="store_true", help="I trust SRC: unpickling it may run code")
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error("reading SRC unpickles arbitrary Python objects; pass --trust if you trust the file")
    n = extract(args.src, args.dst)
    print(f"wrote {n} tensors to {args.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
