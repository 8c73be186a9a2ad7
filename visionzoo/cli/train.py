"""Train any visionzoo / timm backbone on classification, detection or segmentation (Hydra + Lightning).

``visionzoo-train`` and ``python tools/train.py`` run this ``main``:

    python tools/train.py                                   # the CPU demo (synthetic shapes, minutes)
    python tools/train.py task=detection                    # detection demo (Faster R-CNN)
    python tools/train.py model=vim_small task=segmentation data=ade20k data.root=/data/ade trainer=gpu
    torchrun --nproc_per_node 8 tools/train.py model=biformer_small task=detection data=coco \
        data.root=/data/coco trainer=ddp

Configs: configs/train.yaml (see DESIGN.md §5). Bad input (data path, annotation file, image
channels, model name) stops with one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import sys

from visionzoo.cli import REPO

CONFIGS = REPO / "configs"


def _check_groups(argv) -> None:
    """One-line errors for ``group=option`` overrides naming a config file that does not exist."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        if "." in key or not (CONFIGS / key).is_dir() or value in ("null", ""):
            continue
        if not (CONFIGS / key / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in (CONFIGS / key).glob("*.yaml"))
            hint = " (unknown model name)" if key == "model" else ""
            print(f"error: no config {CONFIGS / key / (value + '.yaml')}{hint}; "
                  f"{key} options: {', '.join(options)}", file=sys.stderr)
            sys.exit(2)


def main(argv: list[str] | None = None, config_name: str = "train") -> None:
    """Hydra reads its overrides from ``sys.argv``; ``argv`` (without the program name) replaces them."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if not CONFIGS.is_dir():
        print(f"error: no Hydra configs at {CONFIGS}; install visionzoo from its checkout (pip install -e .)",
              file=sys.stderr)
        sys.exit(2)
    _check_groups(sys.argv[1:])  # before the heavy imports: a typo answers at once

    import hydra

    from visionzoo.data.errors import InputError
    from visionzoo.models._loading import WeightsError
    from visionzoo.tasks.train import evaluate, register_resolvers, run

    register_resolvers()

    @hydra.main(config_path=str(CONFIGS), config_name=config_name, version_base="1.3")
    def _entry(cfg):
        try:
            return (evaluate if config_name == "eval" else run)(cfg)
        except (InputError, WeightsError) as e:  # bad data / config / checkpoint, or a bad pretrained file
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    _entry()

