"""``benchmarks/gpu_check.sh``: its refusals (default run) and its ``--dry-run`` on CPU (slow: every step of
the GPU run at tiny sizes, Triton in its interpreter, a bf16 training step of six models; 2-5 minutes on
two shared cores)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _run(*args, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def test_unknown_argument_is_one_line():
    res = _run("--fast")
    assert res.returncode == 2 and res.stderr.strip() == \
        "gpu_check.sh: unknown argument '--fast' (use --dry-run or nothing)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu():
    res = _run()
    assert res.returncode == 2 and "no CUDA device visible to torch (use --dry-run" in res.stderr
    assert res.stdout == ""


@pytest.mark.slow
def test_dry_run_passes_on_cpu():
    res = _run("--dry-run", timeout=1800)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert "# gpu_check passed" in res.stdout and "FAILED" not in res.stdout
    for step in ("parity", "selective_scan", "routing_attention", "sparse_attention", "neighborhood_aggregation",
                 "vim_vs_deit", "deit_plain_attention", "train_step_bf16"):
        assert f"## {step} (" in res.stdout
