"""visionzoo.export: every family's test variant to ONNX (onnxruntime parity, one file for batch 1 and 3) and
to torch.export with a dynamic batch; the Vim scan as an ONNX Scan; int8 (torch and onnxruntime); the command."""
from __future__ import annotations

import pytest
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.export import (ExportError, check, example_input, export_onnx, export_program, onnx_node_count,
                              onnx_session, quantize_onnx, save)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAMILIES = ("test_vim", "test_biformer", "test_overlock", "test_patnet", "test_dependencyvit", "test_sparsifiner")
TOL = 1e-4  # max |diff| / max |eager|, the bar for the full-size models too


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name).eval()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """One exported file per family, made on first use and shared by the tests below."""
    folder, made = tmp_path_factory.mktemp("onnx"), {}

    def get(name: str):
        if name not in made:
            made[name] = save(export_onnx(_model(name)), folder / f"{name}.onnx")
        return made[name]

    return get


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_matches_eager_dynamic_batch(name, onnx_files):
    model, path = _model(name), onnx_files(name)
    session = onnx_session(path, threads=1)
    assert [n for n in onnx.load(str(path)).graph.node if n.domain not in ("", "ai.onnx")] == []
    for batch in (1, 3):  # one file, two batch sizes
        x = example_input(model, 64, batch=batch, seed=batch)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert out.shape == ref.shape
        assert _relative(out, ref) <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_dynamic_batch(name):
    model = _model(name)
    module = export_program(model).module()
    for batch in (1, 3):
        x = example_input(model, 64, batch=batch, seed=batch)
        with torch.no_grad():
            assert _relative(module(x), model(x)) <= 1e-5


def test_vim_scan_is_one_onnx_scan_per_layer(onnx_files, tmp_path):
    """The graph does not grow with the token count: one Scan per layer, and the same node count for 64 and
    96 pixel inputs (17 and 37 tokens)."""
    model = timm.create_model("test_vim", img_size=96).eval()
    small, large = onnx_files("test_vim"), save(export_onnx(model), tmp_path / "vim96.onnx")
    for path in (small, large):
        graph = onnx.load(str(path)).graph
        assert sum(n.op_type == "Scan" for n in graph.node) == len(model.blocks)
    assert onnx_node_count(small) == onnx_node_count(large)


def test_check_reports_and_fails_beyond_tolerance(onnx_files):
    model, path = _model("test_dependencyvit"), onnx_files("test_dependencyvit")
    report = check(model, path, 64, reps=1)
    assert [r[0] for r in report.rows] == ["random1", "random2", "photo"] and [r[1] for r in report.rows] == [1, 3, 1]
    assert report.worst <= TOL and report.runtime_ms > 0
    other = _model("test_dependencyvit")
    with torch.no_grad():
        other.head.bias.add_(1.0)  # eager now differs from the file
    with pytest.raises(ExportError, match="differs from eager"):
        check(other, path, 64, reps=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_dynamic_int8(name):
    model = _model(name)
    x = example_input(model, 64, batch=2)
    q = torch.ao.quantization.quantize_dynamic(_model(name), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():  # pre-logits features: random-init OverLoCK's logits are ~1e-5, all quantization noise
        ref, out = (m.forward_head(m.forward_features(x), pre_logits=True) for m in (model, q))
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.95
    assert q(x).shape == model(x).shape


@pytest.mark.parametrize("name", ("test_vim", "test_sparsifiner"))
def test_onnxruntime_int8(name, onnx_files, tmp_path):
    model, path = _model(name), onnx_files(name)
    q = quantize_onnx(path, tmp_path / "int8.onnx")
    x = example_input(model, 64, batch=2)
    with torch.no_grad():
        ref = model(x)
    out = torch.from_numpy(onnx_session(q, threads=1).run(None, {"image": x.numpy()})[0])
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.95


def test_command_one_line_failure_leaves_no_file(tmp_path, capsys):
    from visionzoo.cli.export import main

    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        main(["test_vim", "--out", str(out), "--checkpoint", str(tmp_path / "missing.pth")])
    assert str(e.value).startswith("export: --checkpoint") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="must end in .pt2"):
        main(["test_vim", "--format", "pt2", "--out", str(out)])
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit, match="^export: cannot build test_vim from"):
        main(["test_vim", "--out", str(out), "--checkpoint", str(bad)])
    assert list(tmp_path.iterdir()) == [bad]


def test_command_pt2_with_check(tmp_path, capsys):
    from visionzoo.cli.export import main

    out = tmp_path / "p.pt2"
    summary = main(["test_patnet", "--format", "pt2", "--out", str(out), "--check", "--img-size", "64"])
    assert out.is_file() and summary["check"].worst <= TOL
    assert "check passed" in capsys.readouterr().out


def test_benchmark_runtimes_in_one_table():
    from visionzoo.cli.benchmark import main

    rows = main(["--models", "test_patnet", "--img-size", "64", "--no-save", "--reps", "1", "--warmup", "1",
                 "--runtime", "onnxruntime"])
    assert rows[0]["runtime"] == "onnxruntime" and rows[0]["step_ms"] > 0 and not rows[0]["error"]
    rows = main(["--models", "test_patnet", "--img-size", "64", "--no-save", "--mode", "train", "--runtime", "export"])
    assert "fp32 CPU inference only" in rows[0]["error"]
