"""The command-line tools run end to end on small inputs."""
import csv
import json

import matplotlib.image
import pytest
import timm
import torch

from visionzoo.cli import benchmark as bench


def test_benchmark_end_to_end_writes_csv_json_png(tmp_path):
    rows = bench.main(["--model", "test_vim", "test_patnet", "--img-size", "48", "40", "--mode", "both",
                       "--batch-size", "2", "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path),
                       "--tag", "unit"])
    assert len(rows) == 2 * 2 * 2  # models x sizes x modes
    csvs, jsons, pngs = (sorted(tmp_path.glob(f"*.{ext}")) for ext in ("csv", "json", "png"))
    assert len(csvs) == len(jsons) == len(pngs) == 1
    stem = csvs[0].stem
    assert stem == jsons[0].stem == pngs[0].stem
    assert stem.startswith("both-fp32-nchw-bs2-th") and f"pt{torch.__version__.split('+')[0]}-cpu-" in stem
    assert stem.endswith("-unit")

    lines = csvs[0].read_text().splitlines()
    assert lines[0].startswith("# command: python tools/benchmark.py --model test_vim test_patnet")
    assert any(f"torch {torch.__version__}" in line for line in lines if line.startswith("#"))
    table = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    by_key = {(r["model"], int(r["img_size"]), r["mode"]): r for r in table}
    assert len(by_key) == 8
    vim_params = sum(p.numel() for p in timm.create_model("test_vim", img_size=48).parameters())
    for mode in ("infer", "train"):
        ok = by_key[("test_vim", 48, mode)]
        assert ok["error"] == "" and int(ok["params"]) == vim_params and int(ok["batch_size"]) == 2
        assert float(ok["gmacs"]) > 0 and float(ok["img_per_s"]) > 0 and float(ok["step_ms"]) > 0
        assert float(ok["peak_mem_mb"]) > vim_params * 4 / 2**20  # at least the fp32 weights
        bad = by_key[("test_vim", 40, mode)]  # 40 px is not a whole number of 16 px patches
        assert bad["error"].startswith("ValueError: Vim: image height 40") and bad["img_per_s"] == ""
        # CNNs take any size
        assert by_key[("test_patnet", 40, mode)]["error"] == ""
    train, infer = by_key[("test_vim", 48, "train")], by_key[("test_vim", 48, "infer")]
    assert float(train["peak_mem_mb"]) > float(infer["peak_mem_mb"])  # grads, momentum, saved activations

    results = json.loads(jsons[0].read_text())
    assert results["meta"]["torch"] == torch.__version__ and results["meta"]["settings"]["img_sizes"] == [48, 40]
    assert results["models"]["test_vim"]["source"] == "visionzoo"
    assert len(results["rows"]) == 8

    image = matplotlib.image.imread(pngs[0])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    pngs[0].unlink()
    bench.main(["--replot", str(jsons[0])])
    assert matplotlib.image.imread(pngs[0]).shape == image.shape


def test_benchmark_csv_path_flags_of_gpu_check(tmp_path):
    """benchmarks/gpu_check.sh's flags (there with --device cuda): --csv names the files."""
    out = tmp_path / "run_bs1.csv"
    rows = bench.main(["--device", "cpu", "--models", "test_vim", "--batch-size", "1", "--warmup", "0",
                       "--reps", "1", "--max-timed-params", "1e9", "--img-size", "32", "--csv", str(out)])
    assert [r["error"] for r in rows] == [""]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_bs1.csv", "run_bs1.json", "run_bs1.png"]


def test_benchmark_fixed_size_model_gives_error_row_with_params():
    (row,) = bench.main(["--models", "test_vim", "--img-size", "32", "--fixed-size", "--warmup", "0",
                         "--reps", "1", "--no-save"])
    assert row["error"].startswith("ValueError: Vim: this model was built for 64x64 inputs, got 32x32")
    assert row["params"] == sum(p.numel() for p in timm.create_model("test_vim").parameters())
    assert row["img_per_s"] is None and row["gmacs"] is None


def test_benchmark_halves_batch_on_out_of_memory():
    tried = []

    def measure(batch):
        tried.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "measured"

    assert bench.with_oom_backoff(measure, 16) == ("measured", 2)
    assert tried == [16, 8, 4, 2]
    with pytest.raises(RuntimeError, match="out of memory"):  # nothing left to halve
        bench.with_oom_backoff(lambda batch: (_ for _ in ()).throw(RuntimeError("CPU out of memory")), 1)
    calls = []
    with pytest.raises(ValueError, match="bad size"):  # other errors are not retried
        bench.with_oom_backoff(lambda batch: (calls.append(batch), (_ for _ in ()).throw(ValueError("bad size"))), 8)
    assert calls == [8]


def test_benchmark_cpu_peak_memory_counts_weights_once():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    resident = (64 * 32 + 32 + 4 * 64) * 4

    def step():
        with torch.no_grad():  # aten.t(weight) is a view of the weight's storage: not new memory
            y = layer(x)  # 4 x 32 output
            z = y * 2  # second 4 x 32 buffer while y is alive
            del y, z

    assert bench.cpu_step_peak_bytes(step, [*layer.parameters(), x]) == resident + 2 * 4 * 32 * 4


def test_benchmark_accepts_timm_globs_and_rejects_unknown_names():
    assert bench.resolve_models(["deit_tiny_patch16_224", "vim_ti*", "fasternet_t[01]"]) == [
        "deit_tiny_patch16_224", "vim_tiny", "vim_tiny_stride8", "fasternet_t0", "fasternet_t1"]
    assert "test_vim" not in bench.resolve_models(["*"])
    with pytest.raises(SystemExit, match="no visionzoo or timm model matches 'no_such_model'"):
        bench.resolve_models(["no_such_model"])




def test_console_scripts_and_thin_tool_wrappers():
    """pyproject's console commands resolve to argument-free callables in visionzoo.cli; tools/*.py run the
    same mains without touching sys.path."""
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    names = ("train", "eval", "benchmark", "convert", "visualize")
    assert {f"visionzoo-{n}" for n in names} <= set(scripts)
    for target in scripts.values():
        module, attr = target.split(":")
        assert module.startswith("visionzoo.cli.") and callable(getattr(importlib.import_module(module), attr))
    for tool in root.glob("tools/*.py"):
        assert "sys.path" not in tool.read_text(), tool
    help_text = subprocess.run([sys.executable, str(root / "tools" / "benchmark.py"), "--help"], cwd="/",
                               capture_output=True, text=True, check=True).stdout
    assert "--img-size" in help_text
