"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) without a GPU (``benchmarks/gpu_compile.py``).

The compiles run in a subprocess without ``TRITON_INTERPRET`` (this test process has it set when there is
no GPU, and Triton reads it once, at import). The default run compiles the first launch of each of the ten
kernels in bf16 from the smallest variant of each family (20 compiles, about a minute of CPU); ``-m
gpu_compile`` compiles every (kernel, configuration, dtype, target) of every registered Vim, BiFormer,
OverLoCK and Sparsifiner variant (see ``benchmarks/gpu_compile.md``; tens of minutes of CPU).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionzoo.ops import _triton_build
from visionzoo.ops._triton_build import CompileRecord, cdiv, next_pow2

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def _run(code_or_args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _check(res, expected_cases=None):
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = re.search(r"compiled (\d+) \(kernel, configuration, dtype, target\) cases .*: (\d+) ok, (\d+) failed; "
                        r"kernels never launched: none", res.stdout)
    assert summary, res.stdout[-2000:]
    total, ok, failed = map(int, summary.groups())
    print(summary.group(0))
    assert failed == 0 and ok == total
    if expected_cases is not None:
        assert total == expected_cases
    assert "sm_80" in res.stdout and "sm_90" in res.stdout


@needs_triton
def test_every_kernel_compiles_for_sm80_and_sm90_quick():
    _check(_run(["benchmarks/gpu_compile.py", "--quick"], timeout=900), expected_cases=10 * 2)


@needs_triton
@pytest.mark.gpu_compile
def test_every_kernel_config_dtype_compiles_for_sm80_and_sm90():
    _check(_run(["benchmarks/gpu_compile.py"], timeout=7200))


_TOY = r"""
import triton, triton.language as tl, torch
from visionzoo.ops import _triton_build

def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

def broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.no_such_function(BLOCK))

x = torch.zeros(1000, dtype=torch.bfloat16)
with _triton_build.compile_only((80, 90), substitute={torch.bfloat16: torch.float16}) as s:
    copy = _triton_build._CompileOnlyKernel(triton.jit(copy_kernel), s)
    for _ in range(3):  # the same specialisation is compiled once per target
        copy[(8,)](x, x, 1000, BLOCK=128)
    copy[(8,)](x[1:], x, 999, BLOCK=128)  # misaligned: another specialisation
    s.label = "broken"
    _triton_build._CompileOnlyKernel(triton.jit(broken_kernel), s)[(1,)](x, BLOCK=16)
for r in s.records:
    print(r.kernel, r.target, r.dtypes, r.registers, r.spill_stores, r.shared, r.ok, r.error[:60], sep="|")
print("launches", s.launches)
"""


@needs_triton
def test_compile_only_records_resources_and_failures(tmp_path):
    """A launch under compile_only compiles once per (specialisation, target) and dtype substitute,
    records ptxas' registers and spills, and a kernel that does not compile is recorded, not raised."""
    script = tmp_path / "toy.py"  # triton.jit reads the kernels' source from a file
    script.write_text(_TOY)
    res = _run([str(script)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split("|") for line in res.stdout.splitlines() if "|" in line]
    good = [r for r in rows if r[0] == "copy_kernel"]
    # (aligned, misaligned) x (bf16, fp16) x (sm_80, sm_90)
    assert len(good) == 8 and {r[1] for r in good} == {"sm_80", "sm_90"} and {r[2] for r in good} == {"bf16", "fp16"}
    assert all(int(r[3]) > 0 and r[4] == "0" and r[6] == "True" for r in good)
    bad = [r for r in rows if r[0] == "broken_kernel"]
    assert len(bad) == 4 and all(r[6] == "False" and r[7] for r in bad)
    assert "launches 5" in res.stdout


def test_shared_memory_over_the_target_limit_fails():
    rec = CompileRecord("k", "sm_90", "", {}, "fp32", 4, 3, shared=227 * 1024, shared_limit=227 * 1024)
    assert rec.ok
    rec.shared += 1
    assert not rec.ok
    assert _triton_build.SHARED_MEMORY_LIMIT == {80: 163 * 1024, 90: 227 * 1024}


def test_compile_only_needs_a_process_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        with _triton_build.compile_only():
            pass


def test_substitute_keeps_layout():
    base = torch.zeros(4, 10, dtype=torch.bfloat16)
    x = base[:, 1:9:2]
    y = _triton_build._as_dtype(x, torch.bfloat16, torch.float16)
    assert y.dtype == torch.float16 and y.shape == x.shape and y.stride() == x.stride()
    assert y.storage_offset() == x.storage_offset() == 1
    assert _triton_build._as_dtype(3, torch.bfloat16, torch.float16) == 3
    with pytest.raises(ValueError, match="element sizes differ"):
        _triton_build._as_dtype(x, torch.bfloat16, torch.float32)


def test_helpers_and_reasons(monkeypatch):
    assert [next_pow2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]
    assert cdiv(7, 2) == 4 and cdiv(8, 2) == 4
    kernels = _triton_build.TritonKernels("visionzoo.ops.selective_scan._triton_kernel")
    assert kernels.unavailable_reason("mps") in (f"no Triton kernels for device type {'mps'!r}", "Triton is not installed")
    assert _triton_build.launch_device_type(torch.empty(1)) == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.load() is not None:
        assert "TRITON_INTERPRET=1" in kernels.unavailable_reason("cpu")
        assert kernels.unavailable_reason("cuda") is None
    missing = _triton_build.TritonKernels("visionzoo.ops.no_such_module")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert missing.unavailable_reason("cuda") == "Triton is not installed" and missing.load() is None
