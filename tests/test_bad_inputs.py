"""Bad input ends in one line that names the problem, a non-zero exit, and no file in place of a good one
(issue 19, B.1-B.12). The runner and converter are called in-process; one subprocess checks the
command line's exit status and stderr."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

pytest.importorskip("lightning")
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import visionzoo  # noqa: F401,E402
from visionzoo.cli import convert  # noqa: E402
from visionzoo.data import InputError, build_datasets  # noqa: E402
from visionzoo.data.coco import load_coco  # noqa: E402
from visionzoo.models._loading import UnsafeCheckpointError, WeightsError, torch_load_restricted  # noqa: E402
from visionzoo.tasks.train import AtomicCheckpointIO, evaluate, register_resolvers, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=test_patnet", "task.demo.img_size=32", "task.demo.num_train=32", "task.demo.num_val=16",
        "task.demo.batch_size=16", "trainer.progress_bar=false", "logger=none"]


def _cfg(tmp_path, *overrides, name="train", task="classification"):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=[f"task={task}", f"paths.run_dir={tmp_path / 'run'}", *TINY, *overrides])


def _one_line_error(fn, *args, match: str):
    with pytest.raises(InputError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


class _RunsSystem:
    """Pickles as a call of os.system (posix.system): what torch's weights-only unpickler refuses."""

    def __reduce__(self):
        return os.system, ("true",)


# --- weights files (B.1, B.2, B.12) -------------------------------------------------------------
@pytest.fixture(scope="module")
def vim_weights():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in timm.create_model("test_vim").state_dict().items()}


def _convert_fails(tmp_path, src, match):
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as info:
        convert.main(["test_vim", str(src), str(out), "--no-verify"])
    message = str(info.value.code)
    assert message.startswith("convert: ") and "\n" not in message and match in message, message
    assert not out.exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())  # nothing written
    return message


def test_integer_weights_are_refused_not_cast(tmp_path, vim_weights):  # B.1
    from safetensors.torch import save_file
    bad = dict(vim_weights, **{"head.weight": vim_weights["head.weight"].to(torch.int32)})
    save_file(bad, tmp_path / "int.safetensors")
    _convert_fails(tmp_path, tmp_path / "int.safetensors", "head.weight is torch.int32")
    with pytest.raises(WeightsError, match="head.weight is torch.int32"):  # the CLIs print it as one line
        timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "int.safetensors")))


def test_nan_weights_are_refused(tmp_path, vim_weights):  # B.2
    bad = dict(vim_weights)
    bad["blocks.0.mixer.in_proj.weight"] = bad["blocks.0.mixer.in_proj.weight"].clone()
    bad["blocks.0.mixer.in_proj.weight"][0, 0] = float("nan")
    torch.save({"model": bad}, tmp_path / "nan.pth")
    _convert_fails(tmp_path, tmp_path / "nan.pth", "blocks.0.mixer.in_proj.weight holds NaN")


def test_pickled_code_is_named_everywhere(tmp_path, vim_weights):  # B.12
    path = tmp_path / "evil.pth"
    torch.save({"model": vim_weights, "hook": _RunsSystem()}, path)
    with pytest.raises(UnsafeCheckpointError, match="a pickled posix.system") as info:
        torch_load_restricted(path)
    assert info.value.global_name == "posix.system" and "\n" not in str(info.value)
    _convert_fails(tmp_path, path, "posix.system")
    _one_line_error(run, _cfg(tmp_path, f"ckpt_path={path}"), match="posix.system")


# --- data (B.3, B.4, B.7 data.max_size / data.root) ---------------------------------------------
def test_image_error_in_a_loader_worker_is_the_workers_line(tmp_path):  # B.3
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    data = build_datasets("classification", dict(format="imagefolder", root=str(tmp_path), img_size=32))
    loader = torch.utils.data.DataLoader(data.train, batch_size=1, num_workers=1)
    message = _one_line_error(lambda: next(iter(loader)), match="cannot read image")
    assert message.startswith(f"cannot read image {tmp_path / 'train' / 'cat' / 'broken.jpg'}") and len(message) < 300


@pytest.mark.parametrize("bbox", ["oops", [None, 1, 2, 3], ["5", 1, 2, 3], [1, 2, 3]])
def test_coco_boxes_of_the_wrong_type(tmp_path, bbox):  # B.4
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
                               "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox}],
                               "categories": [{"id": 1, "name": "a"}]}))
    _one_line_error(load_coco, ann, match=f"{ann}: annotation 7 has bbox")


def test_data_settings(tmp_path):  # B.7: data.max_size, unset data.root
    _one_line_error(run, _cfg(tmp_path, "data=coco", f"data.root={tmp_path}", "data.max_size=512", task="detection"),
                    match="data.max_size=512 must be greater than data.img_size=800")
    _one_line_error(run, _cfg(tmp_path, "data=imagenet"), match="data.root is not set")


# --- the runner (B.5, B.6, B.7, B.10, B.11, B.12) ------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("task.epochs=abc", "task.epochs must be a positive integer, got 'abc'"),
    ("optim.lr=abc", "optim.lr must be a positive number, got 'abc'"),
    ("seed=abc", "seed must be an integer, got 'abc'"),
    ("trainer.precision=banana", "trainer settings rejected"),
    ("task.demo.batch_size=0", "data.batch_size must be a positive integer (set by task.demo.batch_size"),
    ("resume=yes", "resume must be null or auto, got 'yes'"),
    ("trainer.sync_batchnorm=true", "trainer.sync_batchnorm=true needs CUDA"),  # B.10
    ("task.demo.num_train=8", "the training set has 8 samples, fewer than one batch"),  # B.11
])
def test_bad_config_values(tmp_path, override, match):
    if override == "trainer.sync_batchnorm=true" and torch.cuda.is_available():
        pytest.skip("CPU-only refusal")
    _one_line_error(run, _cfg(tmp_path, override), match=match)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def task_state(tmp_path_factory):
    """A visionzoo training checkpoint's content for test_patnet (built without training)."""
    from visionzoo.tasks.module import TaskModule
    from visionzoo.tasks.train import _container

    cfg = _container(_cfg(tmp_path_factory.mktemp("state")))
    return cfg, TaskModule(cfg, 4).state_dict()


def test_checkpoints_that_do_not_fit(tmp_path, task_state):  # B.5, B.6, B.7 (resume epochs)
    cfg, state = task_state
    other = {"state_dict": {"model.blocks.0.weight": torch.zeros(1)}, "epoch": 0,
             "config": {"model": {"model_name": "test_vim"}}}
    torch.save(other, tmp_path / "other.ckpt")
    _one_line_error(run, _cfg(tmp_path, f"ckpt_path={tmp_path / 'other.ckpt'}"),
                    match="does not fit model test_patnet (it was saved for test_vim): missing")
    torch.save({"state_dict": state, "epoch": 9, "config": cfg}, tmp_path / "ten.ckpt")
    _one_line_error(run, _cfg(tmp_path, f"ckpt_path={tmp_path / 'ten.ckpt'}", "task.epochs=3"),
                    match="has trained 10 epochs, more than trainer.max_epochs=3")
    torch.save({k: v for k, v in state.items()}, tmp_path / "weights.pth")  # a plain weights file
    _one_line_error(evaluate, _cfg(tmp_path, f"ckpt_path={tmp_path / 'weights.pth'}", name="eval"),
                    match="is not a visionzoo training checkpoint")


def test_eval_never_loads_pretrained_weights(tmp_path, task_state):  # B.12
    cfg, state = task_state
    saved = OmegaConf.to_container(OmegaConf.create(cfg))
    saved["model"].update(pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "second.pth")})
    torch.save({"state_dict": state, "epoch": 0, "config": saved, "num_classes": 4}, tmp_path / "best.ckpt")
    metrics = evaluate(_cfg(tmp_path, f"ckpt_path={tmp_path / 'best.ckpt'}", "trainer.limit_val_batches=1", name="eval"))
    assert "val/top1" in metrics and not (tmp_path / "second.pth").exists()


def test_killed_writers_temp_files_are_removed(tmp_path):  # B.8
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    live = tmp_path / f".last.ckpt.tmp-{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"being written")
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
    assert not stale.exists() and live.exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"epoch": 1}


def test_ddp_cpu_config_says_batchnorm_statistics_are_per_process():  # B.10
    text = (ROOT / "configs" / "trainer" / "ddp_cpu.yaml").read_text()
    assert "BatchNorm" in text and "per process" in text


def test_command_line_exit_status_and_single_line(tmp_path):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "task.epochs=abc",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: task.epochs must be a positive integer, got 'abc'"]
    assert not (tmp_path / "run" / "checkpoints").exists()
