"""Dependency tree and unsupervised parts of one image, drawn as a PNG (CPU, a few seconds).

    python examples/dependency_tree.py parts.png
    python examples/dependency_tree.py parts.png --model dependencyvit_lite_tiny --layer 6 --parts 5
    python examples/dependency_tree.py parts.png --image photo.jpg --checkpoint my_dependencyvit.pth

There are no official DependencyViT weights: without ``--checkpoint`` the model is randomly
initialised, so the tree shows the mechanics, not learned parts. Without ``--image`` a synthetic
scene (a sun, a house, a tree on a gradient) is drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import visionzoo  # noqa: E402,F401  (registers the models)
from visionzoo.utils.dependency_tree import (  # noqa: E402
    extract_dependencies, induced_tree, save_part_overlay, segment_parts,
)


def synthetic_image(size: int) -> Image.Image:
    """A gradient sky over grass with a sun, a house and a tree."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / size
        colour = (int(90 + 80 * t), int(150 + 60 * t), 235) if t < 0.65 else (60, int(150 - 40 * t), 50)
        draw.line([(0, y), (size, y)], fill=colour)
    s = size / 224
    draw.ellipse([160 * s, 18 * s, 205 * s, 63 * s], fill=(250, 215, 60))
    draw.rectangle([40 * s, 100 * s, 120 * s, 170 * s], fill=(190, 70, 60))
    draw.polygon([(30 * s, 100 * s), (80 * s, 60 * s), (130 * s, 100 * s)], fill=(110, 50, 40))
    draw.rectangle([70 * s, 135 * s, 90 * s, 170 * s], fill=(70, 40, 30))
    draw.rectangle([165 * s, 120 * s, 177 * s, 180 * s], fill=(100, 70, 40))
    draw.ellipse([140 * s, 75 * s, 202 * s, 135 * s], fill=(40, 120, 45))
    return img


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", help="PNG file to write")
    parser.add_argument("--model", default="dependencyvit_tiny")
    parser.add_argument("--checkpoint", default=None, help="state dict of a trained model (none are published)")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic scene)")
    parser.add_argument("--layer", type=int, default=-1, help="block whose tree is used (default: the last)")
    parser.add_argument("--parts", type=int, default=6, help="number of parts (0: one per tree of the forest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    overlay = None if args.checkpoint is None else dict(file=args.checkpoint)
    model = timm.create_model(args.model, pretrained=overlay is not None, pretrained_cfg_overlay=overlay).eval()
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    image = Image.open(args.image).convert("RGB").resize((size, size), Image.BICUBIC) if args.image \
        else synthetic_image(size)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    x = pixels.permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    batch = ((x - mean) / std)[None]

    deps = extract_dependencies(model, batch, layers=[args.layer])
    parents = deps["parents"][0][0]
    present = int((parents >= 0).sum())
    tree = induced_tree(parents, deps["grid_size"], deps["mass"][0][0])
    labels = segment_parts(tree, num_parts=args.parts or None).reshape(deps["grid_size"])
    save_part_overlay(args.output, image, labels, tree)
    print(f"{args.model}, block {deps['layers'][0]}: {present} of {parents.numel()} patches, "
          f"{len(tree.roots())} root(s), tree depth {int(tree.depth().max())}, "
          f"{int(labels.max()) + 1} part(s) -> {args.output}")


if __name__ == "__main__":
    main()
