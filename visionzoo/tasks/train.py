"""The training / evaluation runner behind ``tools/train.py`` and ``tools/eval.py`` (Lightning).

``run(cfg)`` takes the composed Hydra config (``configs/train.yaml``) and returns the final metrics.
Multi-GPU and multi-node runs are Lightning strategies: ``trainer=ddp`` on one machine (Lightning
starts the processes), ``torchrun`` or SLURM ``srun`` for several (Lightning reads their environment
and starts nothing). Every rank uses the same run directory (``hydra.run.dir`` is derived from the
launcher's job id, see :func:`run_id`), and only rank 0 writes logs and checkpoints.

Checkpoints are Lightning's, written through :class:`AtomicCheckpointIO` (temp file, fsync, rename;
temp files of a killed writer are removed by the next save) and read with
``torch.load(weights_only=True)``: they hold only tensors and plain containers (the resolved config as
a dict, optimizer/scheduler/scaler states, EMA weights in the state dict, loop counters, RNG states).

Bad input stops before anything is built or written, with one :class:`InputError` line: config values
of the wrong type or range (:func:`check_config`), a checkpoint that does not fit the model or is not a
training checkpoint, a resume with fewer epochs than the checkpoint has done, a training set smaller
than one batch, and trainer settings Lightning rejects.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..data.errors import InputError
from ..models._loading import UnsafeCheckpointError, torch_load_restricted

__all__ = ["run", "evaluate", "run_id", "AtomicCheckpointIO", "register_resolvers", "check_config"]

_METRIC = {"classification": "val/top1", "detection": "val/map_50", "segmentation": "val/miou"}


def run_id() -> str:
    """An id shared by all ranks of one job: torchrun's rendezvous id, SLURM's job id, else a timestamp."""
    rid = os.environ.get("VISIONZOO_RUN_ID")
    if rid:
        return rid
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return elastic
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm-" + os.environ["SLURM_JOB_ID"]
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("vz_run_id"):
        OmegaConf.register_new_resolver("vz_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("vz_rank0"):
        # ".hydra" on rank 0, null elsewhere: only rank 0 writes Hydra's config copy
        OmegaConf.register_new_resolver("vz_rank0", lambda value: value if os.environ.get("RANK", "0") == "0" else None)


class AtomicCheckpointIO:
    """Factory for a Lightning ``CheckpointIO`` that writes atomically and loads weights-only."""

    def __new__(cls):
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        class _Atomic(TorchCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                _remove_stale_temp_files(path)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                with open(tmp, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one

            def load_checkpoint(self, path, map_location=None, weights_only=None):
                return load_checkpoint(path)

        return _Atomic()


def _remove_stale_temp_files(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files of ``path`` left by writers that no longer run (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a one-line error naming the file (and, for a file
    that pickles more than tensors, the object torch refused)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        return torch_load_restricted(path)
    except UnsafeCheckpointError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure is a bad file
        raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(cfg: Dict[str, Any]) -> None:
    """One-line errors for config values a run cannot use (types and ranges), before anything is built."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(_is_int(cfg.get("seed", 0)), f"seed must be an integer, got {cfg.get('seed')!r}")
    epochs = cfg["task"].get("epochs")
    need(_is_int(epochs) and epochs >= 1, f"task.epochs must be a positive integer, got {epochs!r}")
    max_epochs = cfg["trainer"].get("max_epochs", 1)
    need(_is_int(max_epochs) and (max_epochs >= 1 or max_epochs == -1),
         f"trainer.max_epochs must be a positive integer (or -1), got {max_epochs!r}")
    lr = cfg["optim"].get("lr")
    need(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
         f"optim.lr must be a positive number, got {lr!r}")
    data = cfg["data"]
    demo = " (set by task.demo.batch_size for data=demo)" if data.get("format") == "demo" else ""
    for key in ("batch_size", "val_batch_size"):
        value = data.get(key)
        if value is not None or key == "batch_size":
            need(_is_int(value) and value >= 1, f"data.{key} must be a positive integer{demo}, got {value!r}")
    need(cfg.get("resume") in (None, "auto"),
         f"resume must be null or auto, got {cfg.get('resume')!r} (to resume from a file: ckpt_path=<file>)")
    t = cfg["trainer"]
    if t.get("sync_batchnorm") and (t.get("accelerator") == "cpu" or not torch.cuda.is_available()):
        raise InputError("trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                         "on CPU every process keeps its own BatchNorm statistics")


def check_checkpoint_fits(ckpt: Dict[str, Any], module: torch.nn.Module, path: str | os.PathLike,
                          model_name: str) -> None:
    """The checkpoint is a visionzoo training checkpoint whose weights fit ``module`` key for key."""
    theirs = ckpt.get("state_dict")
    if not isinstance(theirs, dict):
        raise InputError(f"{path} is not a visionzoo training checkpoint (no 'state_dict'; a plain weights file such "
                         f"as convert's output?); eval and resume need a checkpoint written by visionzoo-train")
    own = module.state_dict()
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [k for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        saved = ((ckpt.get("config") or {}).get("model") or {}).get("model_name")
        origin = f" (it was saved for {saved})" if saved and saved != model_name else ""
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys]
        raise InputError(f"checkpoint {path} does not fit model {model_name}{origin}: " + "; ".join(parts))


def _check_train_size(dataset, data: Dict[str, Any], world_size: int) -> None:
    """Every process must get at least one full batch: the last partial batch is dropped in training."""
    batch, n = int(data["batch_size"]), len(dataset)
    if n // world_size < batch:
        per = f" on each of {world_size} processes" if world_size > 1 else ""
        raise InputError(f"the training set has {n} samples, fewer than one batch (data.batch_size={batch}{per}); "
                         f"the last partial batch is dropped, so nothing would train: lower data.batch_size")


def _container(cfg) -> Dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _strategy(tcfg: Dict[str, Any]):
    spec = tcfg.get("strategy", "auto")
    if not isinstance(spec, dict):
        return spec
    spec = dict(spec)
    name = spec.pop("name")
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        return DDPStrategy(**spec)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        return FSDPStrategy(**spec)
    raise InputError(f"unknown strategy {name!r} in trainer.strategy; use ddp, fsdp or a Lightning strategy name")


def _loggers(cfg: Dict[str, Any], run_dir: Path):
    from lightning.pytorch import loggers

    out = []
    for name in [k for k, on in (cfg.get("logger") or {}).items() if on]:
        if name == "csv":
            out.append(loggers.CSVLogger(str(run_dir), name="csv", version=""))
        elif name == "tensorboard":
            out.append(loggers.TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
        elif name == "wandb":
            out.append(loggers.WandbLogger(save_dir=str(run_dir), project="visionzoo"))
        else:
            raise InputError(f"unknown logger {name!r}; use csv, tensorboard or wandb")
    return out or False


def _norm_stats(model_name: str):
    import timm

    pcfg = timm.models.get_pretrained_cfg(model_name)
    if pcfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(pcfg.mean), tuple(pcfg.std)


def _prepare(cfg: Dict[str, Any], train: bool):
    from ..data import build_datasets
    from . import check_model_name

    check_model_name(cfg["model"]["model_name"])
    mean, std = _norm_stats(cfg["model"]["model_name"])
    task = cfg["task"]["name"]
    if task == "detection":
        hk = cfg["task"].setdefault("head_kwargs", {})
        hk.setdefault("image_mean", list(mean))
        hk.setdefault("image_std", list(std))
    data = build_datasets(task, cfg["data"], mean, std, train=train)
    return data


def _resolve_ckpt(cfg: Dict[str, Any], ckpt_dir: Path) -> Optional[str]:
    if cfg.get("ckpt_path"):
        return str(Path(cfg["ckpt_path"]))
    if cfg.get("resume") == "auto" and (ckpt_dir / "last.ckpt").is_file():
        return str(ckpt_dir / "last.ckpt")
    return None


def _trainer(cfg: Dict[str, Any], run_dir: Path, callbacks, fast_dev_run=False):
    import lightning.pytorch as pl

    t = cfg["trainer"]
    try:
        return _build_trainer(pl, cfg, t, run_dir, callbacks, fast_dev_run)
    except (ValueError, TypeError) as e:  # Lightning's own checks (precision, devices, strategy names, ...)
        if isinstance(e, InputError):
            raise
        raise InputError(f"trainer settings rejected: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _build_trainer(pl, cfg: Dict[str, Any], t: Dict[str, Any], run_dir: Path, callbacks, fast_dev_run):
    return pl.Trainer(
        accelerator=t.get("accelerator", "auto"), devices=t.get("devices", "auto"), num_nodes=t.get("num_nodes", 1),
        strategy=_strategy(t), precision=t.get("precision", "32-true"), max_epochs=t.get("max_epochs", 1),
        accumulate_grad_batches=t.get("accumulate_grad_batches", 1), gradient_clip_val=t.get("gradient_clip_val"),
        gradient_clip_algorithm=t.get("gradient_clip_algorithm", "norm"),
        check_val_every_n_epoch=t.get("check_val_every_n_epoch", 1), log_every_n_steps=t.get("log_every_n_steps", 10),
        limit_train_batches=t.get("limit_train_batches"), limit_val_batches=t.get("limit_val_batches"),
        enable_progress_bar=t.get("progress_bar", True), enable_model_summary=t.get("model_summary", False),
        num_sanity_val_steps=0, deterministic=t.get("deterministic", False), benchmark=t.get("benchmark"),
        sync_batchnorm=t.get("sync_batchnorm", False), fast_dev_run=fast_dev_run or t.get("fast_dev_run", False),
        use_distributed_sampler=False, default_root_dir=str(run_dir), logger=_loggers(cfg, run_dir),
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
    )


def run(cfg, extra_callbacks=()) -> Dict[str, float]:
    """Train as the config says; return the final validation metrics (also printed on rank 0)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .datamodule import DataModule
    from .module import TaskModule

    cfg = _container(cfg)
    check_config(cfg)
    pl.seed_everything(cfg.get("seed", 0), workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg["trainer"].get("matmul_precision", "highest"))
    run_dir = Path(cfg["paths"]["run_dir"])
    data = _prepare(cfg, train=True)
    module = TaskModule(cfg, data.num_classes)
    metric = _METRIC[cfg["task"]["name"]]
    ckpt_dir = run_dir / "checkpoints"
    # best.ckpt: highest validation metric; last.ckpt: every epoch (Lightning's save_last only follows best saves)
    callbacks = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=metric, mode="max", save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
                        enable_version_counter=False),
    ]
    callbacks += list(extra_callbacks)
    ckpt_path = _resolve_ckpt(cfg, ckpt_dir)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint_fits(ckpt, module, ckpt_path, cfg["model"]["model_name"])
        done, max_epochs = int(ckpt.get("epoch", -1)) + 1, cfg["trainer"].get("max_epochs", 1)
        if max_epochs != -1 and max_epochs < done:
            raise InputError(f"checkpoint {ckpt_path} has trained {done} epochs, more than trainer.max_epochs="
                             f"{max_epochs} (task.epochs): raise it to resume")
        del ckpt
    trainer = _trainer(cfg, run_dir, callbacks)
    _check_train_size(data.train, cfg["data"], trainer.world_size)
    dm = DataModule(data, cfg["data"], seed=cfg.get("seed", 0))
    start = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["train_time_s"] = round(time.time() - start, 1)
    if trainer.is_global_zero:
        shown = ", ".join(f"{k}={v:.4f}" if k.startswith("val/") else f"{k}={v}" for k, v in sorted(metrics.items()))
        print(f"final metrics ({cfg['task']['name']}, {cfg['model']['model_name']}, {trainer.current_epoch} epochs): {shown}",
              flush=True)
        print(f"run directory: {run_dir}", flush=True)
    return metrics


def evaluate(cfg) -> Dict[str, float]:
    """Validate the weights of ``cfg.ckpt_path`` (a visionzoo checkpoint) on the configured data."""
    from .datamodule import DataModule
    from .module import TaskModule

    cfg = _container(cfg)
    if not cfg.get("ckpt_path"):
        raise InputError("eval needs ckpt_path=<checkpoint file>")
    ckpt = load_checkpoint(cfg["ckpt_path"])
    if not isinstance(ckpt.get("state_dict"), dict):
        check_checkpoint_fits(ckpt, None, cfg["ckpt_path"], cfg["model"]["model_name"])  # the one-line refusal
    saved = ckpt.get("config") or {}
    for key in ("model", "task", "ema"):  # the checkpoint knows its architecture
        if key in saved:
            cfg[key] = saved[key]
    # the weights come from the checkpoint alone: never download or read pretrained weights here
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "pretrained_cfg_overlay"}
    cfg["model"]["pretrained"] = False
    check_config(cfg)
    run_dir = Path(cfg["paths"]["run_dir"])
    data = _prepare(cfg, train=False)
    module = TaskModule(cfg, ckpt.get("num_classes", data.num_classes))
    check_checkpoint_fits(ckpt, module, cfg["ckpt_path"], cfg["model"]["model_name"])
    module.load_state_dict(ckpt["state_dict"])
    trainer = _trainer(cfg, run_dir, callbacks=[])
    res = trainer.validate(module, datamodule=DataModule(data, cfg["data"], seed=cfg.get("seed", 0)), verbose=False)
    metrics = {k: float(v) for k, v in (res[0] if res else {}).items()}
    if trainer.is_global_zero:
        print("eval metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics
