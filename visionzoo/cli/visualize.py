#!/usr/bin/env python
"""Pictures of what each family computes, on a real photo that scikit-image ships (no download).

    python tools/visualize.py --what biformer_routing --model biformer_tiny --out routing.png
    python tools/visualize.py --what vim_erf --model vim_tiny --checkpoint vim_tiny.safetensors --out erf.png
    python tools/visualize.py --what all --out pictures/          # one PNG per picture, default models

Pictures (``--what``):

``biformer_routing``         BiFormer's bi-level routing: for the query point's region, the top-k key
                             regions it attends to, in every BRA stage (last block of the stage).
``sparsifiner_connections``  Sparsifiner's predicted connectivity: for the query token, which keys each
                             head keeps (colour = number of heads), in the first, middle and last block.
``dependencyvit_parts``      DependencyViT's dependency tree (child -> parent edges, roots as circles) and
                             the part segmentation its subtrees give, at the middle and last block, and
                             the message mass each patch receives.
``overlock_kernels``         OverLoCK's context-guided dynamic kernels (ContMix): the per-pixel large and
                             small kernels at the query point, in place on the image (mean over groups),
                             and each group's large kernel.
``vim_erf``                  Vim's effective receptive field: |d centre output token / d input|, summed
                             over channels, after a quarter, half, three quarters and all of the blocks.

The models run with random weights (seed 0) unless ``--checkpoint`` names a file, which loads the timm
way (``pretrained_cfg_overlay=dict(file=...)``, strictly; official files and tools/convert.py outputs
alike). Random weights show the mechanism (which regions, connections, kernels the computation uses),
not what a trained model attends to. The query point is given as fractions of the image height and
width (``--point 0.22 0.45``: the astronaut's face). Every failure is one ``visualize: ...`` line.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.layers import plain_feature_indices
from visionzoo.models import VISIONZOO_MODELS

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
DEFAULT_POINT = (0.22, 0.45)  # (y, x) as fractions: the astronaut's face
ERF_DECADES = 6
FLAT = 1e-4  # a kernel whose max - min is below this fraction of its max is drawn as flat


class VisualizeError(Exception):
    """A problem with the user's input: reported as one line."""


# --- inputs ---------------------------------------------------------------------------------------------
def load_photo(name: str, size: int) -> np.ndarray:
    """A bundled scikit-image photo (or an image file), centre-cropped square, resized: (size, size, 3) uint8."""
    from PIL import Image

    if name in PHOTOS:
        import skimage.data

        image = getattr(skimage.data, name)()
    else:
        try:
            image = np.asarray(Image.open(name).convert("RGB"))
        except OSError as e:
            raise VisualizeError(f"--image {name}: not a bundled photo ({', '.join(PHOTOS)}) and not a readable "
                                 f"image file ({e})") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + s, left:left + s, :3]))
    return np.array(crop.resize((size, size), Image.BICUBIC))


def to_input(model: torch.nn.Module, photo: np.ndarray) -> torch.Tensor:
    """(1, 3, H, W) normalised with the model's mean / std."""
    cfg = model.pretrained_cfg
    x = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def build_model(name: str, checkpoint: str | None = None, img_size: int | None = None) -> torch.nn.Module:
    if name not in VISIONZOO_MODELS:
        raise VisualizeError(f"unknown model {name!r}; visionzoo models: {', '.join(sorted(VISIONZOO_MODELS))}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise VisualizeError(f"--checkpoint {checkpoint}: no such file")
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size else {}
    if checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)})
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad checkpoint or size, as one line
        raise VisualizeError(f"cannot build {name}" + (f" from {checkpoint}" if checkpoint else "")
                             + f": {' '.join(str(e).split())[:300]}") from None
    return model.eval()


def image_size(model: torch.nn.Module, img_size: int | None) -> int:
    return img_size or int(model.pretrained_cfg["input_size"][-1])


@contextlib.contextmanager
def _intercept(module: Any, name: str, record: Callable[..., Any]):
    """Replace ``module.name`` (a function the model calls by its module-global name) by ``record`` for the
    duration; ``record`` receives the original function first."""
    original = getattr(module, name)
    setattr(module, name, lambda *a, **k: record(original, *a, **k))
    try:
        yield
    finally:
        setattr(module, name, original)


# --- what each family computes --------------------------------------------------------------------------
@torch.no_grad()
def biformer_routing(model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Routing of every BRA call, in block order: ``idx`` (n_regions, topk) for the image (regions row-major),
    ``n_win``, the token ``grid`` BRA ran on (padded to multiples of ``n_win`` if the model pads), ``topk``,
    and the block's ``stage`` and ``stride`` (pixels per token)."""
    from visionzoo.models import biformer as module

    calls: list[dict[str, Any]] = []

    def record(fn, q, k, v, num_heads, n_win, topk, scale, **kwargs):
        out, idx = fn(q, k, v, num_heads, n_win, topk, scale, **dict(kwargs, return_routing=True))
        calls.append({"idx": idx[0].cpu(), "n_win": tuple(n_win), "grid": tuple(q.shape[1:3]), "topk": topk})
        return out

    with _intercept(module, "bi_level_routing_attention", record):
        model(x)
    # One call per BRA block, in block order (the last stage is global attention, no routing).
    owners = [(s, model.feature_info[s]["reduction"]) for s, stage in enumerate(model.stages)
              for block in stage.blocks if hasattr(block.attn, "n_win")]
    if len(owners) != len(calls):
        raise VisualizeError(f"expected one routing call per BRA block ({len(owners)}), saw {len(calls)}")
    for call, (s, stride) in zip(calls, owners):
        call.update(stage=s, stride=stride)
    return calls


@torch.no_grad()
def sparsifiner_connections(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Kept key indices of every block: (heads, N - 1 query rows, budget) into the N tokens (0 = class)."""
    kept: list[torch.Tensor] = []
    hooks = [b.attn.mask_predictor.register_forward_hook(lambda m, a, out: kept.append(out[0][0].cpu()))
             for b in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return kept


@torch.no_grad()
def overlock_kernels(model: torch.nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Dynamic kernels of every ContMix call: ``attn`` (G, H, W, K*K) softmax weights and ``K``, in call
    order (per block: the small kernel, then the large one)."""
    from visionzoo.models import overlock as module

    calls: list[dict[str, Any]] = []

    def record(fn, attn, value, kernel_size, **kwargs):
        calls.append({"attn": attn[0].cpu(), "K": int(kernel_size)})
        return fn(attn, value, kernel_size, **kwargs)

    with _intercept(module, "na2d_av", record):
        model(x)
    return calls


def vim_erf(model: torch.nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """|d (sum of the centre patch token's features) / d input| summed over channels, (H, W) per block."""
    x = x.clone().requires_grad_(True)
    feats = model.forward_intermediates(x, indices=blocks, output_fmt="NCHW", intermediates_only=True)
    out = []
    for i, f in enumerate(feats):
        h, w = f.shape[-2:]
        (grad,) = torch.autograd.grad(f[0, :, h // 2, w // 2].sum(), x, retain_graph=i < len(feats) - 1)
        out.append(grad[0].abs().sum(0).detach())
    return out


# --- drawing --------------------------------------------------------------------------------------------
def _figure(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.8), squeeze=False)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return fig, list(axes[0])


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the suptitle
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out


def _mark(ax, y: float, x: float) -> None:
    ax.plot([x], [y], marker="*", markersize=13, color="yellow", markeredgecolor="black")


def _weights(checkpoint: str | None) -> str:
    return f"weights {Path(checkpoint).name}" if checkpoint else "random weights"


def draw_biformer_routing(model, photo, point, checkpoint, name):
    from matplotlib.patches import Rectangle

    size = photo.shape[0]
    calls = biformer_routing(model, to_input(model, photo))
    last = {}
    for c in calls:
        last[c["stage"]] = c  # the last BRA block of each stage
    py, px = point[0] * size, point[1] * size
    fig, axes = _figure(1 + len(last), f"{name}: bi-level routing for the query point ({_weights(checkpoint)})")
    axes[0].imshow(photo)
    _mark(axes[0], py, px)
    axes[0].set_title("query point", fontsize=9)
    for ax, (s, c) in zip(axes[1:], sorted(last.items())):
        (n_h, n_w), (H, W), stride = c["n_win"], c["grid"], c["stride"]
        rh, rw = H // n_h * stride, W // n_w * stride  # region size in pixels (padded grid)
        q = min(int(py // rh), n_h - 1) * n_w + min(int(px // rw), n_w - 1)
        ax.imshow(photo, alpha=0.45)
        for r in c["idx"][q].tolist():
            ax.add_patch(Rectangle(((r % n_w) * rw, (r // n_w) * rh), rw, rh, color="tab:blue", alpha=0.45, lw=0))
        for i in range(1, n_h):
            ax.axhline(i * rh - 0.5, color="white", lw=0.5)
        for j in range(1, n_w):
            ax.axvline(j * rw - 0.5, color="white", lw=0.5)
        ax.add_patch(Rectangle(((q % n_w) * rw, (q // n_w) * rh), rw, rh, fill=False, edgecolor="red", lw=2))
        _mark(ax, py, px)
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        ax.set_title(f"stage {s + 1}: top-{c['topk']} of {n_h * n_w} regions\n(red: query region, blue: routed)",
                     fontsize=9)
    return fig


def draw_sparsifiner_connections(model, photo, point, checkpoint, name):
    size = photo.shape[0]
    kept = sparsifiner_connections(model, to_input(model, photo))
    gh, gw = model.grid_size
    n = gh * gw
    q = min(int(point[0] * gh), gh - 1) * gw + min(int(point[1] * gw), gw - 1)
    full = [i for i, k in enumerate(kept) if k.shape[1] == n]  # blocks before any token pruning
    if not full:
        raise VisualizeError(f"{name} prunes tokens before its first block; no block sees every query token")
    chosen = sorted({full[0], full[len(full) // 2], full[-1]})
    fig, axes = _figure(1 + len(chosen), f"{name}: keys kept for the query token ({_weights(checkpoint)})")
    axes[0].imshow(photo)
    _mark(axes[0], (q // gw + 0.5) * size / gh, (q % gw + 0.5) * size / gw)
    axes[0].set_title("query token", fontsize=9)
    heads = kept[0].shape[0]
    for ax, b in zip(axes[1:], chosen):
        keys = kept[b][:, q]  # (heads, budget) token indices, 0 = class token
        count = torch.zeros(n + 1).index_add_(0, keys.flatten(), torch.ones(keys.numel()))
        ax.imshow(photo, alpha=0.35)
        im = ax.imshow(count[1:].reshape(gh, gw).numpy(), cmap="magma", alpha=0.75, vmin=0, vmax=heads,
                       extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
        _mark(ax, (q // gw + 0.5) * size / gh, (q % gw + 0.5) * size / gw)
        ax.set_title(f"block {b + 1}: {keys.shape[1]} of {n + 1} keys per head\n"
                     f"(colour: heads keeping the key; class token: {int(count[0])}/{heads})", fontsize=9)
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.02)
    return fig


def draw_dependencyvit_parts(model, photo, point, checkpoint, name, num_parts: int = 6):
    from visionzoo.utils.dependency_tree import (
        extract_dependencies,
        induced_tree,
        part_overlay,
        segment_parts,
    )

    depth = len(model.blocks)
    layers = sorted({depth // 2 - 1 if depth > 1 else 0, depth - 1})
    deps = extract_dependencies(model, to_input(model, photo), layers=layers)
    grid = deps["grid_size"]
    image = torch.from_numpy(photo).permute(2, 0, 1)
    fig, axes = _figure(2 + len(layers), f"{name}: dependency trees and parts ({_weights(checkpoint)})")
    axes[0].imshow(photo)
    axes[0].set_title("image", fontsize=9)
    for ax, layer, parents, mass in zip(axes[1:], deps["layers"], deps["parents"], deps["mass"]):
        tree = induced_tree(parents[0].cpu(), grid, mass[0].cpu())
        labels = segment_parts(tree, num_parts).reshape(grid)
        ax.imshow(np.asarray(part_overlay(image, labels, tree)))
        roots = len(tree.roots())
        ax.set_title(f"block {layer + 1}: {roots} tree{'s' if roots != 1 else ''}, {int(labels.max()) + 1} parts\n"
                     f"(lines: child -> parent; circles: roots)", fontsize=9)
    ax = axes[-1]
    ax.imshow(photo, alpha=0.35)
    im = ax.imshow(deps["mass"][-1][0].reshape(grid).cpu().numpy(), cmap="viridis", alpha=0.75,
                   extent=(-0.5, photo.shape[1] - 0.5, photo.shape[0] - 0.5, -0.5), interpolation="nearest")
    ax.set_title(f"block {deps['layers'][-1] + 1}: message mass received", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    return fig


def draw_overlock_kernels(model, photo, point, checkpoint, name):
    from visionzoo.ops.neighborhood_aggregation import window_starts

    size = photo.shape[0]
    calls = overlock_kernels(model, to_input(model, photo))
    if not calls:
        raise VisualizeError(f"{name} ran no ContMix block at this size")
    small, large = calls[0], calls[1]  # the first ContMix block (stride 16): small kernel, then large
    last = calls[-1]  # the last ContMix block's large kernel (stride 32)

    def window(call):
        G, H, W, _ = call["attn"].shape
        K = call["K"]
        i, j = min(int(point[0] * H), H - 1), min(int(point[1] * W), W - 1)
        top, left = int(window_starts(H, K)[i]), int(window_starts(W, K)[j])  # NATTEN's clamped window
        kernel = call["attn"][:, i, j].reshape(G, K, K)
        sy, sx = size / H, size / W
        extent = (left * sx - 0.5, (left + K) * sx - 0.5, (top + K) * sy - 0.5, top * sy - 0.5)
        return kernel, extent, (H, W)

    G = large["attn"].shape[0]
    fig, axes = _figure(4, f"{name}: context-guided dynamic kernels at the query point ({_weights(checkpoint)})")
    for ax, call, label in ((axes[0], small, "first ContMix block, small"), (axes[1], large, "first ContMix block, large"),
                            (axes[2], last, "last ContMix block, large")):
        kernel, extent, (H, W) = window(call)
        mean = kernel.mean(0)
        lo, hi = float(mean.min()), float(mean.max())
        ax.imshow(photo, alpha=0.5)
        # colours span the kernel's own range (random weights give nearly flat kernels; the title says how flat)
        if hi - lo <= FLAT * hi:  # flat up to float rounding: one colour, not stretched rounding noise
            lo, hi = 0.0, 2 * hi
        ax.imshow(mean.numpy(), cmap="inferno", alpha=0.7, extent=extent, interpolation="nearest", vmin=lo, vmax=hi)
        _mark(ax, point[0] * size, point[1] * size)
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        span = "flat" if lo == 0.0 else f"weights {lo:.3g}-{hi:.3g}"
        ax.set_title(f"{label}: {call['K']}x{call['K']} on {H}x{W}\nmean of {G} groups, {span}", fontsize=9)
    kernel, _, _ = window(large)
    cols = math.ceil(math.sqrt(G))
    rows = math.ceil(G / cols)
    K = large["K"]
    montage = np.full((rows * (K + 1) - 1, cols * (K + 1) - 1), np.nan)
    for g in range(G):
        r, c = divmod(g, cols)
        k = kernel[g].numpy()
        span = k.max() - k.min()
        tile = (k - k.min()) / span if span > FLAT * k.max() else np.full_like(k, 0.5)
        montage[r * (K + 1):r * (K + 1) + K, c * (K + 1):c * (K + 1) + K] = tile
    axes[3].imshow(np.ma.masked_invalid(montage), cmap="inferno", interpolation="nearest", vmin=0, vmax=1)
    axes[3].set_title(f"first block, large kernel of each of the {G} groups\n(each from its min to its max; "
                      f"flat ones at mid-scale)", fontsize=9)
    return fig


def draw_vim_erf(model, photo, point, checkpoint, name):
    depth = len(model.blocks)
    blocks = sorted(set(plain_feature_indices(depth)))
    from matplotlib.patches import Rectangle

    erfs = vim_erf(model, to_input(model, photo), blocks)
    (gh, gw), (sy, sx), (ph, pw) = model.patch_embed.grid_size, model.patch_embed.stride, model.patch_embed.patch_size
    centre = ((gw // 2) * sx, (gh // 2) * sy)  # top-left pixel of the centre token's patch
    fig, axes = _figure(1 + len(blocks), f"{name}: effective receptive field of the centre token ({_weights(checkpoint)})")
    axes[0].imshow(photo)
    axes[0].set_title("image", fontsize=9)
    for ax, b, erf in zip(axes[1:], blocks, erfs):
        # log scale over six decades: the weak long-range paths stay visible next to the token's own patch
        heat = torch.log10(erf / erf.max()).clamp(min=-ERF_DECADES)
        ax.imshow(photo, alpha=0.3)
        im = ax.imshow(heat.numpy(), cmap="viridis", alpha=0.8, vmin=-ERF_DECADES, vmax=0)
        ax.add_patch(Rectangle((centre[0] - 0.5, centre[1] - 0.5), pw, ph, fill=False, edgecolor="red", lw=1))
        ax.set_title(f"after block {b + 1} of {depth}\n(log10 |gradient| / max; centre token in red)", fontsize=9)
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.02)
    return fig


PICTURES: dict[str, tuple[str, str, Callable[..., Any]]] = {
    # what: (family, default model, drawing function)
    "biformer_routing": ("biformer", "biformer_tiny", draw_biformer_routing),
    "sparsifiner_connections": ("sparsifiner", "sparsifiner_deit_small", draw_sparsifiner_connections),
    "dependencyvit_parts": ("dependencyvit", "dependencyvit_tiny", draw_dependencyvit_parts),
    "overlock_kernels": ("overlock", "overlock_xt", draw_overlock_kernels),
    "vim_erf": ("vim", "vim_tiny", draw_vim_erf),
}


def render(what: str, out: str | Path, model: str | None = None, checkpoint: str | None = None,
           image: str = "astronaut", point: tuple[float, float] = DEFAULT_POINT, img_size: int | None = None) -> Path:
    """Draw one picture to ``out`` (PNG); returns its path. Raises :class:`VisualizeError` on bad input."""
    if what not in PICTURES:
        raise VisualizeError(f"unknown --what {what!r}; choose from {', '.join(PICTURES)} or all")
    family, default, draw = PICTURES[what]
    name = model or default
    if name in VISIONZOO_MODELS and VISIONZOO_MODELS[name].family != family:
        raise VisualizeError(f"--what {what} needs a {family} model, {name} is {VISIONZOO_MODELS[name].family}")
    if not all(0.0 <= p <= 1.0 for p in point):
        raise VisualizeError(f"--point {point[0]} {point[1]}: give (y, x) as fractions of the image in [0, 1]")
    net = build_model(name, checkpoint, img_size)
    photo = load_photo(image, image_size(net, img_size))
    try:
        fig = draw(net, photo, point, checkpoint, name)
    except VisualizeError:
        raise
    except ValueError as e:  # e.g. an input size the model cannot take
        raise VisualizeError(f"{name}: {' '.join(str(e).split())[:300]}") from None
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise VisualizeError(f"--out {out}: the picture is a PNG; name the file *.png")
    return _save(fig, out)


def render_all(out_dir: str | Path, models: dict[str, str] | None = None, **kwargs) -> list[Path]:
    """Every picture with its default model (or ``models[what]``) into ``out_dir/<what>.png``."""
    return [render(what, Path(out_dir) / f"{what}.png", model=(models or {}).get(what), **kwargs)
            for what in PICTURES]


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", required=True, help=f"{', '.join(PICTURES)}, or all")
    p.add_argument("--model", help="model for the picture (default: the family's smallest variant)")
    p.add_argument("--out", required=True, help="PNG file (a folder with --what all)")
    p.add_argument("--checkpoint", help="weights file (official or converted); default: random weights")
    p.add_argument("--image", default="astronaut", help=f"bundled photo ({', '.join(PHOTOS)}) or an image file")
    p.add_argument("--point", type=float, nargs=2, default=DEFAULT_POINT, metavar=("Y", "X"),
                   help="query point as fractions of the image height and width (default 0.22 0.45)")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    args = p.parse_args(argv)
    try:
        if args.what == "all":
            if args.model or args.checkpoint:
                raise VisualizeError("--what all uses each family's default model; --model / --checkpoint go "
                                     "with a single --what")
            paths = render_all(args.out, image=args.image, point=tuple(args.point), img_size=args.img_size)
        else:
            paths = [render(args.what, args.out, args.model, args.checkpoint, args.image, tuple(args.point),
                            args.img_size)]
    except VisualizeError as e:
        raise SystemExit(f"visualize: {e}") from None
    for path in paths:
        print(f"wrote {path}")
    return paths


def cli() -> None:  # visionzoo-visualize: a console script would pass main's written paths to sys.exit
    main()
