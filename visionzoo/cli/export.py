"""Export a model to ONNX or to a ``torch.export`` program, and check the file against eager.

    visionzoo-export vim_tiny --format onnx --out vim_tiny.onnx --check
    python tools/export.py biformer_tiny --checkpoint biformer_tiny.safetensors --img-size 256 --out b.onnx
    python tools/export.py patnet_t0 --format pt2 --static-batch --out patnet_t0.pt2 --check

The model is built with timm (``--checkpoint``: any file the model loads, through
``pretrained_cfg_overlay=dict(file=...)``; random weights otherwise), in eval mode, at ``--img-size``
(default: the model's input size). The batch dimension of the file is dynamic unless ``--static-batch``.
``--format onnx`` (default) writes one ``.onnx`` file (weights inside, opset ``--opset``) whose every op
is a standard ONNX operator; ``pt2`` writes the ExportedProgram (``torch.export.load`` after
``import visionzoo``). The file is written atomically: a failed export leaves no file behind.

``--check`` runs the written file (onnxruntime on the CPU, or the loaded program) on two random inputs
(batch 1 and 3) and a scikit-image photo, prints max |diff| and max |diff| / max |eager| for each and the
batch-1 latency of the runtime and of eager, and fails when the relative difference exceeds
``--tolerance`` (1e-4). Every failure is one ``export: ...`` line and exit status 1.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import timm
import torch

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.export import (DEFAULT_OPSET, FORMATS, TOLERANCE, ExportError, check, default_img_size, export_onnx,
                              export_program, onnx_node_count, save)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="visionzoo-export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a timm model name (visionzoo's or any other)")
    p.add_argument("--checkpoint", default=None, help="weights file the model loads (default: random weights)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="H [W]",
                   help="input size (default: the model's)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=True,
                       help="dynamic batch dimension (the default)")
    batch.add_argument("--static-batch", dest="dynamic_batch", action="store_false", help="batch fixed to 1")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--out", default=None, help="output file (default: <model>.<format> here)")
    p.add_argument("--check", action="store_true", help="run the file against eager (see above)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |diff| / max |eager| for --check")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the check's runtime")
    args = p.parse_args(argv)
    if args.img_size is not None and len(args.img_size) > 2:
        p.error("--img-size takes H or H W")
    return args


def build(name: str, checkpoint: str | None, img_size: tuple[int, int] | None) -> torch.nn.Module:
    """The timm model in eval mode, with ``checkpoint`` loaded and built for ``img_size`` when given."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise ExportError(f"unknown model {name!r} (not a timm model name)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ExportError(f"--checkpoint {checkpoint}: no such file")
    kwargs: dict[str, Any] = {}
    if checkpoint:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)})
    torch.manual_seed(0)
    try:
        try:
            model = timm.create_model(name, **kwargs, **({"img_size": img_size} if img_size else {}))
        except TypeError:  # models without an img_size argument take any size as built
            model = timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - a bad checkpoint or size, as one line
        raise ExportError(f"cannot build {name}" + (f" from {checkpoint}" if checkpoint else "")
                          + f": {' '.join(str(e).split())[:300]}") from None
    return model.eval()


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Export (and check) as the arguments say; returns a summary. Raises :class:`ExportError`."""
    img_size = tuple(args.img_size * 2)[:2] if args.img_size else None
    out = Path(args.out or f"{args.model}.{args.format}")
    if out.suffix != f".{args.format}":
        raise ExportError(f"--out {out} must end in .{args.format} for --format {args.format}")
    model = build(args.model, args.checkpoint, img_size)
    img_size = img_size or default_img_size(model)
    start = time.perf_counter()
    if args.format == "onnx":
        program = export_onnx(model, img_size, dynamic_batch=args.dynamic_batch, opset=args.opset)
    else:
        program = export_program(model, img_size, dynamic_batch=args.dynamic_batch)
    save(program, out)
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {"path": str(out), "export_s": seconds, "img_size": img_size}
    detail = f", {onnx_node_count(out)} nodes" if args.format == "onnx" else ""
    batch = "dynamic batch" if args.dynamic_batch else "batch 1"
    log(f"export: wrote {out} ({args.model}, {img_size[0]}x{img_size[1]}, {batch}{detail}) in {seconds:.1f} s")
    if args.check:
        report = check(model, out, img_size, dynamic_batch=args.dynamic_batch, tolerance=args.tolerance,
                       threads=args.threads)
        for line in report.lines():
            log(line)
        log(f"export: check passed (worst relative difference {report.worst:.3g} <= {args.tolerance:g})")
        summary["check"] = report
    return summary


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        return run(args)
    except ExportError as e:
        raise SystemExit(f"export: {e}") from None


def cli() -> None:  # visionzoo-export: a console script would pass main's summary to sys.exit
    main()
