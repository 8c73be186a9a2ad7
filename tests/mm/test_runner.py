"""End to end with the real mmdet / mmseg: the shipped configs (custom_imports = visionzoo.mm), shrunk to a
tiny backbone per family, train 2 iterations and evaluate through mmengine's Runner on a generated
COCO-format / ADE-format set (CocoMetric / IoUMetric); the checkpoint mmengine saved reloads."""
from __future__ import annotations

import math
import os

import pytest
import torch

from ._tiny import CONFIGS, tiny_config

pytestmark = pytest.mark.mm

DET_CASES = [
    ("mask-rcnn_biformer-s_fpn_1x_coco.py", "test_biformer"),
    ("retinanet_overlock-t_fpn_1x_coco.py", "test_overlock"),
    ("mask-rcnn_patnet-det-s_fpn_1x_coco.py", "test_patnet"),
    ("cascade-mask-rcnn_vim-s_sfp-fpn_1x_coco.py", "test_vim"),
    ("retinanet_biformer-s_fpn_1x_coco.py", "test_dependencyvit"),
    ("retinanet_patnet-det-s_fpn_1x_coco.py", "test_sparsifiner"),
]
SEG_CASES = [
    ("upernet_biformer-s_160k_ade20k-512x512.py", "test_biformer"),
    ("upernet_overlock-t_160k_ade20k-512x512.py", "test_overlock"),
    ("upernet_patnet-s_160k_ade20k-512x512.py", "test_patnet"),
    ("upernet_vim-s_160k_ade20k-512x512.py", "test_vim"),
    ("upernet_dependencyvit-s_160k_ade20k-512x512.py", "test_dependencyvit"),
    ("fpn_sparsifiner-deit-s_80k_ade20k-512x512.py", "test_sparsifiner"),
]


def _train_and_evaluate(cfg):
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    runner.train()  # 2 iterations, then the evaluation (the last iteration always validates)
    hub = runner.message_hub.log_scalars
    metrics = {k[len("val/"):]: v.current() for k, v in hub.items() if k.startswith("val/")}
    return runner, metrics


def _reload_and_compare(runner, cfg, monkeypatch):
    """The checkpoint mmengine saved loads into a freshly built model (mmengine's own loader needs
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: its files pickle the message hub), weights identical."""
    from mmengine.registry import MODELS
    from mmengine.runner import load_checkpoint

    ckpt = os.path.join(cfg.work_dir, "iter_2.pth")
    assert os.path.isfile(ckpt)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = MODELS.build(cfg.model)
    load_checkpoint(model, ckpt, map_location="cpu", strict=True)
    trained = runner.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    return ckpt


@pytest.mark.parametrize("config,model_name", DET_CASES, ids=[c[1] for c in DET_CASES])
def test_mmdet_train_evaluate_reload(config, model_name, coco_dir, tmp_path, monkeypatch):
    from mmengine.registry import DefaultScope

    cfg = tiny_config(CONFIGS / "mmdet" / config, model_name, coco_dir, tmp_path / "work")
    runner, metrics = _train_and_evaluate(cfg)
    assert runner.iter == 2
    assert "coco/bbox_mAP" in metrics and math.isfinite(metrics["coco/bbox_mAP"])
    if "mask" in config:
        assert "coco/segm_mAP" in metrics
    backbone = runner.model.backbone
    assert type(backbone).__name__ == "VisionZooBackbone" and backbone.model_name == model_name
    if model_name == "test_overlock":  # the config's context-fused detection output is kept
        assert isinstance(backbone.timm_model.h_proj, torch.nn.Module)
    with DefaultScope.overwrite_default_scope("mmdet"):
        _reload_and_compare(runner, cfg, monkeypatch)


@pytest.mark.parametrize("config,model_name", SEG_CASES, ids=[c[1] for c in SEG_CASES])
def test_mmseg_train_evaluate_reload(config, model_name, ade_dir, tmp_path, monkeypatch):
    from mmengine.registry import DefaultScope

    cfg = tiny_config(CONFIGS / "mmseg" / config, model_name, ade_dir, tmp_path / "work")
    runner, metrics = _train_and_evaluate(cfg)
    assert runner.iter == 2
    assert "mIoU" in metrics and 0.0 <= metrics["mIoU"] <= 100.0
    assert type(runner.model).__name__ == "EncoderDecoder"
    assert runner.model.backbone.model_name == model_name
    with DefaultScope.overwrite_default_scope("mmseg"):
        _reload_and_compare(runner, cfg, monkeypatch)
