"""Evaluate a visionzoo checkpoint: ``python tools/eval.py ckpt_path=<run>/checkpoints/best.ckpt [data=...]``.

``visionzoo-eval`` runs the same ``main``. The model, task head and EMA settings are read from the
checkpoint's stored config; data, trainer and everything else come from configs/eval.yaml and the
command line (as in tools/train.py). The weights are the checkpoint's alone: evaluation never downloads
or reads pretrained weights, whatever the stored config says. A file that is not a visionzoo training
checkpoint, or does not fit its model, stops with one ``error:`` line (exit status 2).
"""
from __future__ import annotations

from visionzoo.cli import train


def main(argv: list[str] | None = None) -> None:
    train.main(argv, config_name="eval")

