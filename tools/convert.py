#!/usr/bin/env python
"""Convert an official checkpoint file into a plain visionzoo state dict.

    python tools/convert.py vim_tiny vim_t_midclstok_76p1acc.pth vim_tiny.safetensors [--ema]

The file is loaded exactly as ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` does (the family's ``checkpoint_filter_fn``, strict key
matching), then the model's own state dict is written (``.safetensors`` or ``.pth``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visionzoo  # noqa: E402,F401


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="visionzoo model name, e.g. vim_tiny")
    p.add_argument("checkpoint", help="official checkpoint file")
    p.add_argument("output", help="output file (.safetensors or .pth)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training-state file")
    args = p.parse_args(argv)

    name = f"{args.model}.in1k_ema" if args.ema else args.model
    if args.ema and name not in timm.list_pretrained(name):
        raise SystemExit(f"convert: {args.model} has no EMA weights tag ({name}); drop --ema")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    out = Path(args.output)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state_dict, str(out))
    else:
        torch.save(state_dict, out)
    print(f"wrote {len(state_dict)} tensors ({sum(v.numel() for v in state_dict.values()):,} values) to {out}")


if __name__ == "__main__":
    main()
