"""Evaluate a visionzoo checkpoint: ``python tools/eval.py ckpt_path=<run>/checkpoints/best.ckpt [data=...]``.

The model, task head and EMA settings are read from the checkpoint's stored config; data, trainer
and everything else come from configs/eval.yaml and the command line (as in tools/train.py).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("visionzoo_train_tool", Path(__file__).with_name("train.py"))
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

if __name__ == "__main__":
    _train.main("eval")
