"""tools/train.py end to end on tiny demo runs: fast dev runs, checkpoints, kill-and-resume, eval, errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from visionzoo.data import InputError  # noqa: E402
from visionzoo.tasks.train import evaluate, register_resolvers, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "classification": ["task.demo.img_size=32", "task.demo.num_train=64", "task.demo.num_val=32",
                       "task.demo.batch_size=16"],
    "detection": ["task.demo.img_size=64", "task.demo.num_train=8", "task.demo.num_val=4", "task.demo.batch_size=2",
                  "task.head_kwargs.fpn_channels=16", "task.head_kwargs.representation_size=32",
                  "task.head_kwargs.mask_head_channels=8", "task.head_kwargs.anchor_sizes=[8,16,32,64,128]"],
    "segmentation": ["task.demo.img_size=64", "task.demo.num_train=16", "task.demo.num_val=8",
                     "task.demo.batch_size=4", "task.head_kwargs.decoder_channels=16"],
}


def make_cfg(tmp_path, *overrides, task="classification", name="train"):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=[f"task={task}", f"paths.run_dir={tmp_path}", "trainer.progress_bar=false",
                                        "logger=csv", *TINY[task], *overrides])


@pytest.mark.parametrize("task,head", [("classification", None), ("detection", "faster_rcnn"),
                                       ("detection", "mask_rcnn"), ("segmentation", "upernet")])
def test_fast_dev_run(tmp_path, task, head):
    over = ["trainer.fast_dev_run=true"] + ([f"task.head={head}"] if head else [])
    metrics = run(make_cfg(tmp_path, *over, task=task))
    key = {"classification": "val/top1", "detection": "val/map_50", "segmentation": "val/miou"}[task]
    assert key in metrics and 0.0 <= metrics[key] <= 1.0
    if head == "mask_rcnn":
        assert "val/mask_map" in metrics


def _weights(ckpt):
    return {k: v for k, v in ckpt["state_dict"].items()}


class _Crash(Callback):
    """Simulates a kill: the process dies at the start of epoch ``at`` (after epoch at-1 was saved)."""

    def __init__(self, at):
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise RuntimeError("simulated kill")


RESUME = ["model=test_patnet", "task.epochs=3", "ema.enabled=true", "ema.decay=0.9", "trainer.limit_train_batches=3",
          "trainer.limit_val_batches=1", "sched.warmup_steps=2", "optim.layer_decay=0.8",
          "trainer.gradient_clip_val=1.0", "trainer.accumulate_grad_batches=2"]


def test_checkpoint_weights_only_and_kill_resume(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    run(make_cfg(full_dir, *RESUME))
    ckpt_path = full_dir / "checkpoints" / "last.ckpt"
    full = torch.load(ckpt_path, weights_only=True)  # plain containers only
    assert full["epoch"] == 2 and full["config"]["model"]["model_name"] == "test_patnet"
    assert any(k.startswith("ema.") for k in full["state_dict"])
    assert full["optimizer_states"] and full["lr_schedulers"] and "rng" in full
    assert (full_dir / "checkpoints" / "best.ckpt").is_file()
    assert not list((full_dir / "checkpoints").glob(".*tmp*"))  # no temp files left behind

    with pytest.raises(RuntimeError, match="simulated kill"):
        run(make_cfg(killed_dir, *RESUME), extra_callbacks=[_Crash(at=2)])
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    run(make_cfg(killed_dir, *RESUME, "resume=auto"))
    resumed = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == full["global_step"]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")

    metrics = evaluate(make_cfg(tmp_path / "eval", f"ckpt_path={ckpt_path}", name="eval"))
    assert "val/top1" in metrics


def test_bad_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.ckpt") as e:
        run(make_cfg(tmp_path, f"ckpt_path={bad}"))
    assert "\n" not in str(e.value)


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "model=no_such_model"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no_such_model.yaml" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "data=imagenet",
                           f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert err == [f"error: data root not found: {tmp_path / 'missing'}"]


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes (gloo), half the batch each: same final metric as 1 process."""
    common = ["task.demo.img_size=32", "task.demo.num_train=128", "task.demo.num_val=64", "task.epochs=2",
              "trainer.progress_bar=false", "logger=csv"]
    one = run(make_cfg(tmp_path / "one", *common, "task.demo.batch_size=16"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / "train.py"), "trainer=ddp_cpu", "task.demo.batch_size=8",
           f"hydra.run.dir={tmp_path / 'two'}", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("final metrics")]
    assert len(line) == 1  # rank 0 only
    top1 = float(line[0].split("val/top1=")[1].split(",")[0])
    assert abs(top1 - one["val/top1"]) <= 0.1, (top1, one)
    assert (tmp_path / "two" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "two" / "csv" / "version_1").exists()
