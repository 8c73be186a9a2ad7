"""Every shipped configs/mm config loads with mmengine's Config and builds its full-size model on the meta
device (no memory, no weights); the neck / decode head widths match what the backbone returns."""
from __future__ import annotations

import pytest
import torch

from ._tiny import CONFIGS

pytestmark = pytest.mark.mm

ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.py") if "_base_" not in p.parts)


def test_every_promised_config_is_there():
    names = set(ALL)
    for arch in ("mask-rcnn", "retinanet"):
        for fam in ("biformer-s", "overlock-t", "patnet-det-s"):
            assert f"mmdet/{arch}_{fam}_fpn_1x_coco.py" in names
    assert "mmdet/cascade-mask-rcnn_vim-s_sfp-fpn_1x_coco.py" in names
    for fam in ("biformer-s", "overlock-t", "patnet-s", "vim-s", "dependencyvit-s", "sparsifiner-deit-s"):
        assert f"mmseg/upernet_{fam}_160k_ade20k-512x512.py" in names
        assert f"mmseg/fpn_{fam}_80k_ade20k-512x512.py" in names


@pytest.mark.parametrize("rel", ALL)
def test_config_builds_on_meta_with_matching_widths(rel):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(CONFIGS / rel))
    scope = rel.split("/")[0]
    assert cfg.default_scope == scope
    assert cfg.custom_imports.imports == ["visionzoo.mm"]
    assert cfg.model.backbone.type == "visionzoo.Backbone"
    if scope == "mmdet":
        assert cfg.train_dataloader.dataset.data_root == "data/coco/"
        assert cfg.val_evaluator.ann_file == "data/coco/annotations/instances_val2017.json"
    else:
        assert cfg.train_dataloader.dataset.data_root == "data/ade/ADEChallengeData2016"
    init_default_scope(scope)
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    import visionzoo.mm  # noqa: F401  (what custom_imports does)

    cfg.model.backbone.pretrained = False  # offline: the official weights are not fetched here
    with torch.device("meta"):
        model = (DET_MODELS if scope == "mmdet" else SEG_MODELS).build(cfg.model)
    widths = model.backbone.out_channels
    if "neck" in cfg.model:
        assert list(cfg.model.neck.in_channels) == widths
    else:
        assert list(cfg.model.decode_head.in_channels) == widths
        assert cfg.model.auxiliary_head.in_channels == widths[2]
    assert model.backbone.strides == [4, 8, 16, 32]
    if cfg.optim_wrapper.get("constructor") == "visionzoo.LayerDecayOptimizerConstructor":
        assert model.backbone.plain
