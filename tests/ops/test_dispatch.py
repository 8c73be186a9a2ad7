"""The op contract (visionzoo.ops._dispatch): forced-backend errors, the DEBUG reasons of ``auto``, the
fail-safe for fallible (Triton) backends, the tracing rule, and the plain-aten paths for exporters."""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest
import timm
import torch

import visionzoo  # noqa: F401
from visionzoo.ops import _dispatch, aten_only, decompositions
from visionzoo.ops._dispatch import Backend, OpDecl
from visionzoo.ops.selective_scan import _op as scan_op
from visionzoo.ops.selective_scan import selective_scan


def _toy(fallible_forward, name="toy_op"):
    """An op with a fallible first choice and a plain second one (both compute 2 x)."""
    return OpDecl(name, backends=(
        Backend("fast", fallible_forward, fallible=True),
        Backend("plain", lambda x: 2 * x),
        Backend("gpu_only", lambda x: 2 * x, devices=("cuda",)),
    ), auto_order={"default": ("fast", "plain")})


def _launch_fails(x):
    raise RuntimeError("triton.CompilationError: at 3:4: out of resources\nmore detail")


def test_auto_falls_back_with_one_warning_and_the_same_result(caplog):
    op = _toy(_launch_fails)
    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING, logger="visionzoo.ops"):
        out = op.dispatch("auto", x, lambda b: b.forward(x))
        again = op.dispatch("auto", x, lambda b: b.forward(x))  # remembered: no second try, no second warning
    torch.testing.assert_close(out, 2 * x)
    torch.testing.assert_close(again, 2 * x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "toy_op" in message and "'fast'" in message and "out of resources" in message
    assert "more detail" not in message  # the error's first line only
    assert op.select("auto", x) == "plain"
    assert op.select("auto", x.double()) == "fast"  # marked unusable for this (op, device, dtype) only
    with pytest.raises(RuntimeError, match="out of resources"):  # a forced backend still raises
        op.dispatch("fast", x, lambda b: b.forward(x))


def test_a_proven_backend_keeps_its_errors():
    calls = []

    def flaky(x):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return 2 * x

    op = _toy(flaky, "toy_flaky")
    x = torch.ones(2)
    op.dispatch("auto", x, lambda b: b.forward(x))
    with pytest.raises(RuntimeError, match="out of memory"):  # not a first-use failure: propagates
        op.dispatch("auto", x, lambda b: b.forward(x))


def test_a_failing_triton_launch_in_a_real_op_falls_back(monkeypatch, caplog):
    """The scan's triton backend made to fail at launch (as a kernel that does not compile would):
    ``auto`` (here via the environment variable's order) reruns the call on the next backend."""
    def broken(*args, **kwargs):
        raise RuntimeError("PTXASError: ptxas fatal: Unresolved extern function")

    triton = scan_op.SCAN.by_name["triton"]
    monkeypatch.setitem(scan_op.SCAN.by_name, "triton", dataclasses.replace(
        triton, forward=broken, available=lambda device_type: None))
    monkeypatch.setattr(scan_op.SCAN, "auto_order", {"default": ("triton", "chunked")})
    monkeypatch.delenv("VISIONZOO_BACKEND_SELECTIVE_SCAN", raising=False)
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 4, 9, generator=g) for _ in range(3))
    A = -torch.rand(4, 3, generator=g)
    B, C = (torch.randn(1, 3, 9, generator=g) for _ in range(2))
    with caplog.at_level(logging.WARNING, logger="visionzoo.ops"):
        out = selective_scan(u, delta, A, B, C, z=z)
    torch.testing.assert_close(out, selective_scan(u, delta, A, B, C, z=z, backend="chunked"))
    assert [r.getMessage() for r in caplog.records if "'triton' failed on first use" in r.getMessage()]
    with pytest.raises(RuntimeError, match="PTXASError"):
        selective_scan(u, delta, A, B, C, z=z, backend="triton")


def test_forced_backend_error_is_one_line_and_debug_shows_the_reasons(caplog):
    op = _toy(lambda x: 2 * x, "toy_op")
    x = torch.ones(1)
    with pytest.raises(RuntimeError) as info:
        op.select("gpu_only", x)
    assert str(info.value) == ("toy_op: backend 'gpu_only' cannot run here: not available on device type 'cpu' "
                               "(runs on cuda)")
    op2 = OpDecl("toy_reasons", backends=(
        Backend("big", lambda x: x, can_run=lambda x, n=0: None if n <= 4 else f"takes n <= 4, got n={n}"),
        Backend("any", lambda x: x),
    ), auto_order={"default": ("big", "any")})
    with caplog.at_level(logging.DEBUG, logger="visionzoo.ops"):
        assert op2.select("auto", x, n=9) == "any"
    text = caplog.text
    assert "toy_reasons: skipped backend 'big' on cpu/torch.float32: takes n <= 4, got n=9" in text
    assert "toy_reasons: backend 'any' on cpu/torch.float32" in text


def test_public_lookup_by_op_name(monkeypatch):
    """``visionzoo.ops.is_available`` / ``resolve`` answer for every declared op by its name, as the op's
    own declaration does; unknown op or backend names are a ``ValueError``."""
    from visionzoo.ops import is_available, resolve

    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    assert resolve("selective_scan", "auto", x) == scan_op.SCAN.select("auto", x) == "chunked"  # fp64: no C kernel
    assert resolve("selective_scan", "reference", x) == "reference"
    monkeypatch.setenv("VISIONZOO_BACKEND_SELECTIVE_SCAN", "reference")
    assert resolve("selective_scan", "auto", x) == "reference"
    for op in ("selective_scan", "causal_conv1d", "neighborhood_aggregation", "routing_attention",
               "sparse_attention", "reversed_attention", "sparse_keys", "rms_norm"):
        decl = _dispatch.declaration(op)
        for name in decl.names:
            assert is_available(op, name, "cpu") == decl.is_available(name, "cpu")
    assert not is_available("selective_scan", "mamba", "cpu")
    with pytest.raises(ValueError, match="unknown op 'scan'; known ops: causal_conv1d, "):
        is_available("scan", "cpu", "cpu")
    with pytest.raises(ValueError, match="selective_scan: unknown backend 'fast'"):
        is_available("selective_scan", "fast", "cpu")


def test_visionzoo_log_debug_switch():
    """``VISIONZOO_LOG=debug`` (read when visionzoo is imported) prints the selection and the reasons."""
    code = ("import torch, visionzoo\nfrom visionzoo.ops.selective_scan import selective_scan\n"
            "u = torch.randn(1, 2, 3, dtype=torch.float64)\n"
            "selective_scan(u, u, -torch.ones(2, 1, dtype=torch.float64), torch.randn(1, 1, 3).double(), "
            "torch.randn(1, 1, 3).double())\n")
    env = {"VISIONZOO_LOG": "debug", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "selective_scan: skipped backend 'cpu' on cpu/torch.float64: does not support dtype" in res.stderr
    assert "INFO visionzoo.ops: selective_scan: backend 'chunked' on cpu/torch.float64" in res.stderr


def test_no_c_kernel_while_tracing(monkeypatch):
    """Under tracing the native (ctypes) backends are skipped by auto and give way when forced."""
    monkeypatch.setattr(_dispatch, "tracing", lambda: True)
    monkeypatch.delenv("VISIONZOO_BACKEND_SELECTIVE_SCAN", raising=False)
    u = torch.ones(1, 2, 3)
    assert scan_op.SCAN.select("auto", u) == "chunked"
    assert scan_op.SCAN.select("cpu", u) == "chunked"


def test_jit_trace_of_vim_matches_eager():
    """``torch.jit.trace`` (the legacy ONNX exporter's tracer) never reaches a ctypes kernel: the fused
    mixer path switches off and the custom ops take their traceable backends."""
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)
        y = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(traced(y), model(y), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~25 s: vim_tiny at 224
def test_jit_trace_of_vim_tiny_matches_eager():
    model = timm.create_model("vim_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_custom_op_has_an_aten_path():
    table = decompositions()
    ops = {f"visionzoo::{name}" for name in (
        "selective_scan", "selective_scan_bidirectional", "causal_conv1d", "causal_conv1d_bidirectional",
        "bi_level_routing_attention", "bi_level_routing_attention_triton", "na2d_av", "sparse_attention",
        "reversed_attention")}
    assert ops <= {op.name() for op in table}
    assert all(isinstance(op, torch._ops.OpOverload) for op in table)


def _export_dynamic(model, x):
    batch = torch.export.Dim("batch", min=1, max=8)
    return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("name", ["test_vim", "test_biformer", "dependencyvit_tiny"])
def test_decompositions_give_a_plain_aten_program_with_dynamic_batch(name):
    kwargs = dict(depth=1, img_size=64) if name == "dependencyvit_tiny" else {}
    model = timm.create_model(name, **kwargs).eval()
    size = 64
    ep = _export_dynamic(model, torch.randn(2, 3, size, size))
    assert any("visionzoo" in str(n.target) for n in ep.graph.nodes)
    ep = ep.run_decompositions(decompositions())
    assert not [n for n in ep.graph.nodes if "visionzoo" in str(n.target)]
    x3 = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x3), model(x3), rtol=1e-4, atol=1e-4)


def test_aten_only_runs_no_custom_op():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 64, 64)
    with aten_only():
        ep = _export_dynamic(model, x)
        with torch.no_grad():
            out = model(x)
    assert not [n for n in ep.graph.nodes if "visionzoo" in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
