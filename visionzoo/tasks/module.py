"""Lightning training of any task model (needs the ``train`` extra: lightning, torchmetrics).

What is whose:

* the training loop, precision (AMP bf16/fp16 and its grad scaler), gradient accumulation and
  clipping, DDP/FSDP, loggers and checkpoint scheduling are Lightning's (``Trainer`` arguments);
* metrics are torchmetrics' (top-1/top-5 accuracy, COCO mAP for boxes and masks through
  pycocotools, mean IoU);
* EMA is timm's ``ModelEmaV3``, held as the ``ema`` submodule so its weights ride in the state dict
  (saved, restored on resume, averaged nowhere else);
* layer-wise lr decay is timm's ``param_groups_layer_decay`` over the backbone's ``group_matcher``;
  parameters outside the timm model (FPN, detector heads, decoders) get the full learning rate.

Written here: the per-task step/metric glue, the warmup + cosine schedule as a ``LambdaLR`` (so its
state is a plain dict), and saving the global RNG states so that a resumed run continues the very
random stream an uninterrupted run would have drawn (dropout, drop-path, loader seeds).
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from . import build_task_model, timm_model_of

__all__ = ["TaskModule", "build_param_groups", "warmup_cosine"]


def model_kwargs(mcfg: Dict[str, Any]) -> Dict[str, Any]:
    """``timm.create_model`` kwargs of a ``configs/model`` entry (everything but the target, name and pretrained)."""
    return {k: v for k, v in mcfg.items() if k not in ("_target_", "model_name", "pretrained")}


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: Optional[float]) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: timm's weight-decay split, layer-wise decay on the timm backbone.

    Each group's ``lr`` is ``lr * lr_scale`` (``lr_scale`` = ``layer_decay ** (depth - layer)``), so the
    schedule (a ``LambdaLR``) scales every group from its own starting value.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    backbone = timm_model_of(model)
    if layer_decay is None or layer_decay == 1.0 or not hasattr(backbone, "group_matcher"):
        groups = param_groups_weight_decay(model, weight_decay, _no_wd(model, backbone))
    else:
        groups = param_groups_layer_decay(backbone, weight_decay, _no_wd(backbone, backbone), layer_decay=layer_decay)
        seen = {id(p) for g in groups for p in g["params"]}
        rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        decay = [p for n, p in rest if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in rest if not (p.ndim > 1 and not n.endswith(".bias"))]
        groups += [g for g in ({"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return groups


def _no_wd(model: nn.Module, backbone: nn.Module) -> set:
    names = set(getattr(backbone, "no_weight_decay", lambda: set())())
    if model is backbone:
        return names
    prefix = next((n + "." for n, m in model.named_modules() if m is backbone), "")
    return {prefix + n for n in names}


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """Linear warmup from 0 then cosine to ``min_factor``; a picklable-free closure for ``LambdaLR``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return f


class TaskModule(pl.LightningModule):
    """One LightningModule for the three tasks; ``cfg`` is the resolved Hydra config as a plain dict."""

    def __init__(self, cfg: Dict[str, Any], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.task = cfg["task"]["name"]
        self.num_classes = num_classes
        tcfg, mcfg = cfg["task"], cfg["model"]
        self.model = build_task_model(
            self.task, mcfg["model_name"], num_classes, head=tcfg.get("head"), pretrained=mcfg.get("pretrained", False),
            backbone_kwargs=model_kwargs(mcfg), **(tcfg.get("head_kwargs") or {}),
        )
        if tcfg.get("grad_checkpointing"):
            timm_model_of(self.model).set_grad_checkpointing(True)
        self.channels_last = bool(cfg["trainer"].get("channels_last", False))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        ecfg = cfg.get("ema") or {}
        self.ema = None
        if ecfg.get("enabled", False):
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=ecfg.get("decay", 0.9998), warmup_power=ecfg.get("warmup_power", 2 / 3),
                                  use_warmup=ecfg.get("warmup", True))
            self.ema.requires_grad_(False)  # averaged, never optimised (and ignored by DDP)
        # compiled forward kept outside the module tree: the eager module keeps the state-dict keys
        self.__dict__["_compiled"] = torch.compile(self.model) if cfg["trainer"].get("compile", False) else None
        self._pending_rng: Optional[Dict[str, Any]] = None
        self._build_metrics()

    # --- metrics ------------------------------------------------------------------------------
    def _build_metrics(self) -> None:
        if self.task == "classification":
            from torchmetrics.classification import MulticlassAccuracy
            self.val_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
            self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average="micro")
        elif self.task == "detection":
            from torchmetrics.detection import MeanAveragePrecision
            iou = ("bbox", "segm") if getattr(self.model, "with_masks", False) else "bbox"
            self.val_map = MeanAveragePrecision(iou_type=iou, backend="pycocotools")
        else:
            from torchmetrics.classification import MulticlassJaccardIndex
            self.val_miou = MulticlassJaccardIndex(self.num_classes, average="macro",
                                                   ignore_index=self.cfg["task"].get("head_kwargs", {}).get("ignore_index", 255))

    # --- steps --------------------------------------------------------------------------------
    def _forward(self, *args):
        return (self._compiled if self._compiled is not None else self.model)(*args)

    def _to_cl(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and torch.is_tensor(x) and x.ndim == 4 else x

    def training_step(self, batch, batch_idx):
        if self.task == "classification":
            x, y = batch
            logits = self._forward(self._to_cl(x))
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg["task"].get("label_smoothing", 0.0))
            losses = {"loss_cls": loss}
        elif self.task == "detection":
            images, targets = batch
            losses = self._forward(list(images), list(targets))
        else:
            x, y = batch
            losses = self.model.loss(self._forward(self._to_cl(x)), y)
        loss = sum(losses.values())
        bs = len(batch[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=False)
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"], prog_bar=True, batch_size=bs)
        return loss

    def on_before_zero_grad(self, optimizer) -> None:
        # called once per optimizer step (after accumulation), the point where EMA should follow
        if self.ema is not None and self.trainer.training:
            self.ema.update(self.model, step=self.global_step)

    def _eval_model(self) -> nn.Module:
        use_ema = self.ema is not None and (self.cfg.get("ema") or {}).get("eval", True)
        return self.ema.module if use_ema else self.model

    def validation_step(self, batch, batch_idx):
        model = self._eval_model()
        model.eval()
        if self.task == "classification":
            x, y = batch
            logits = model(self._to_cl(x))
            self.val_top1.update(logits, y)
            self.val_top5.update(logits, y)
        elif self.task == "detection":
            images, targets = batch
            preds = model(list(images))
            for p in preds:
                if "masks" in p:
                    p["masks"] = p["masks"][:, 0] > 0.5  # (N, 1, H, W) probabilities -> (N, H, W) bool
            tgts = [{"boxes": t["boxes"], "labels": t["labels"],
                     **({"masks": t["masks"].bool()} if "masks" in t else {})} for t in targets]
            self.val_map.update(preds, tgts)
        else:
            x, y = batch
            logits = model(self._to_cl(x))
            self.val_miou.update(logits.argmax(1), y)

    def on_validation_epoch_end(self) -> None:
        if self.task == "classification":
            self.log("val/top1", self.val_top1.compute(), prog_bar=True, sync_dist=True)
            self.log("val/top5", self.val_top5.compute(), sync_dist=True)
            self.val_top1.reset(), self.val_top5.reset()
        elif self.task == "detection":
            res = self.val_map.compute()
            self.val_map.reset()
            if "map_50" in res:  # single iou type
                self.log("val/map", res["map"], sync_dist=True)
                self.log("val/map_50", res["map_50"], prog_bar=True, sync_dist=True)
            else:
                self.log("val/map", res["bbox_map"], sync_dist=True)
                self.log("val/map_50", res["bbox_map_50"], prog_bar=True, sync_dist=True)
                self.log("val/mask_map", res["segm_map"], sync_dist=True)
                self.log("val/mask_map_50", res["segm_map_50"], sync_dist=True)
        else:
            self.log("val/miou", self.val_miou.compute(), prog_bar=True, sync_dist=True)
            self.val_miou.reset()

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        ocfg, scfg = self.cfg["optim"], self.cfg["sched"]
        groups = build_param_groups(self.model, ocfg["lr"], ocfg.get("weight_decay", 0.0), ocfg.get("layer_decay"))
        extra = {k: v for k, v in ocfg.items() if k not in ("name", "lr", "weight_decay", "layer_decay")}
        optimizer = create_optimizer_v2(groups, opt=ocfg["name"], lr=ocfg["lr"], weight_decay=ocfg.get("weight_decay", 0.0),
                                        **extra)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(scfg.get("warmup_steps") or round(scfg.get("warmup_epochs", 0) * total / max(1, self.trainer.max_epochs)))
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, scfg.get("min_lr_ratio", 0.0)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- checkpoints: plain containers + RNG --------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["config"] = self.cfg
        checkpoint["num_classes"] = self.num_classes
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}),
        }

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get("rng")

    def on_train_start(self) -> None:
        # restore the RNG after Lightning's own setup so the next draws match the uninterrupted run
        rng, self._pending_rng = self._pending_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
