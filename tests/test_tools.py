"""The command-line tools run end to end on small inputs."""
import argparse
import importlib.util
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_and_csv(tmp_path):
    bench = _load_tool("benchmark")
    csv_path = tmp_path / "bench.csv"
    rows = bench.main(["--models", "test_*", "--img-size", "64", "--warmup", "0", "--reps", "1",
                       "--csv", str(csv_path)])
    by_name = {r["model"]: r for r in rows}
    assert "test_vim" in by_name
    row = by_name["test_vim"]
    assert row["params"] == sum(p.numel() for p in timm.create_model("test_vim").parameters())
    assert row["gmacs"] > 0 and row["img_per_s"] > 0
    text = csv_path.read_text()
    assert text.startswith("# command: python tools/benchmark.py --models test_*")
    assert "test_vim" in text


def test_convert_official_vim_checkpoint(tmp_path):
    convert = _load_tool("convert")
    src = timm.create_model("vim_tiny")
    official = {("layers." + k[7:] if k.startswith("blocks.") else "norm_f." + k[5:] if k.startswith("norm.") else k): v
                for k, v in src.state_dict().items()}
    torch.save({"model": official, "args": argparse.Namespace(lr=1.0)}, tmp_path / "official.pth")
    convert.main(["vim_tiny", str(tmp_path / "official.pth"), str(tmp_path / "vim_tiny.safetensors")])
    model = timm.create_model("vim_tiny", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "vim_tiny.safetensors")))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
