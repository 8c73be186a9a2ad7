"""Shrink the shipped configs/mm configs to CPU-test size (tiny backbones, ~100 px images, 2 iterations)."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "mm"


def _walk(obj, fn):
    """Apply ``fn`` to every dict inside ``obj`` (a config tree), depth first."""
    if isinstance(obj, dict):
        for v in obj.values():
            _walk(v, fn)
        fn(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, fn)


def _cpu_norms(node):
    if node.get("type") == "SyncBN":
        node["type"] = "BN"


_WIDTHS = {"in_channels": 32, "out_channels": 32, "feat_channels": 32, "conv_out_channels": 32, "channels": 32,
           "fc_out_channels": 64}


def _narrow(node):
    """Neck / head widths (256 / 512 / 1024 in the papers' setups) down to 32 / 64: CPU-test speed."""
    for key, width in _WIDTHS.items():
        value = node.get(key)
        if key == "in_channels" and node.get("type") == "FPN":
            continue  # the neck takes the backbone's widths
        if isinstance(value, int) and value >= 128:
            node[key] = width
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and v >= 128 for v in value):
            node[key] = [width] * len(value)


def _few_samples(node):
    if node.get("type", "").endswith("Sampler") and "num" in node:
        node["num"] = 32
    if "nms_pre" in node:
        node.update(nms_pre=100, max_per_img=50)


def backbone_channels(backbone_cfg: dict):
    """Build the backbone once (CPU, tiny) to read its ``out_channels``."""
    from mmengine.registry import MODELS

    import visionzoo.mm  # noqa: F401

    return MODELS.build(dict(backbone_cfg)).out_channels


def tiny_config(path, model_name: str, data_root, work_dir, *, model_kwargs=None):
    """Load ``path`` with mmengine and point it at ``model_name`` (a ``test_*`` variant), the tiny set
    under ``data_root``, 2 training iterations, one evaluation and one checkpoint in ``work_dir``."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(path))
    is_det = "mmdet" in Path(path).parts
    from visionzoo.models import VISIONZOO_MODELS

    bb = cfg.model.backbone
    same_family = VISIONZOO_MODELS[bb.model_name].family == VISIONZOO_MODELS[model_name].family
    if model_kwargs is not None or not same_family:  # keep the family options (n_win, h_proj) otherwise
        bb.model_kwargs = dict(model_kwargs or {})
    bb.model_name = model_name
    bb.pretrained = False
    bb.pop("drop_path_rate", None)
    bb.pop("out_indices", None)  # the tiny variant's own levels (plain ones have 3 blocks)
    channels = backbone_channels(bb)
    if "neck" in cfg.model and "in_channels" in cfg.model.neck:
        cfg.model.neck.in_channels = channels
    head = cfg.model.get("decode_head")
    if "neck" not in cfg.model and head and isinstance(head.get("in_channels"), (list, tuple)):
        head.in_channels = channels  # UPerNet reads the backbone directly
    if "auxiliary_head" in cfg.model and cfg.model.auxiliary_head:
        cfg.model.auxiliary_head.in_channels = channels[2]
    _walk(cfg._cfg_dict, _cpu_norms)
    for key, node in cfg.model.items():
        if key != "backbone" and isinstance(node, dict):
            _walk(node, _narrow)
    if "train_cfg" in cfg.model:
        _walk(cfg.model.train_cfg, _few_samples)

    def shrink(node):
        t = node.get("type")
        if t in ("Resize", "RandomResize") and "scale" in node:
            node["scale"] = (128, 96)
        if t == "RandomResize":
            node["ratio_range"] = (0.9, 1.1)
        if t == "RandomCrop":
            node["crop_size"] = (64, 64)
        if "persistent_workers" in node:
            node["persistent_workers"] = False
        if "num_workers" in node:
            node["num_workers"] = 0
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        _walk(cfg[key], shrink)
        cfg[key].dataset.data_root = str(data_root)
    cfg.train_dataloader.batch_size = 2
    if is_det:
        # an untrained detector scores below the usual 0.05: keep every box so the metrics see predictions
        def few_boxes(node):
            if "score_thr" in node:
                node.update(score_thr=0.0, max_per_img=20)
            elif "max_per_img" in node:  # RPN proposals
                node.update(nms_pre=200, max_per_img=50)
        _walk(cfg.model.test_cfg, few_boxes)
        cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=4)
        for key in ("val_evaluator", "test_evaluator"):
            cfg[key].ann_file = os.path.join(str(data_root), "annotations/instances_val2017.json")
    else:
        cfg.model.data_preprocessor.size = (64, 64)
        if "data_preprocessor" in cfg:
            cfg.data_preprocessor.size = (64, 64)
        cfg.model.test_cfg = dict(mode="whole")
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=2, val_interval=2)
    cfg.param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=2, by_epoch=False)
    cfg.log_processor = dict(by_epoch=False)
    cfg.work_dir = str(work_dir)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="gloo"))
    cfg.randomness = dict(seed=0)
    return cfg
