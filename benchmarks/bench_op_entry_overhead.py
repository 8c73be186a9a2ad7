#!/usr/bin/env python
"""Per-call Python overhead of the ops' public entries (validation, dispatch, custom-op call) on tiny inputs,
where the kernels cost next to nothing: a check that a refactor of the entries does not slow the call path.
One thread, process CPU time, no grad, minimum over rounds of 500 calls, in microseconds.

    OMP_NUM_THREADS=1 python benchmarks/bench_op_entry_overhead.py [SOURCE_ROOT]

``SOURCE_ROOT`` (default: this checkout) is put first on ``sys.path``, so an older tree
(``git archive REV visionzoo | tar -x -C /tmp/base``) can be timed the same way, in its own process;
alternate the two a few times and compare the minima (see benchmarks/op_entry_overhead.md).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import visionzoo  # noqa: E402,F401
from visionzoo.ops.causal_conv1d import causal_conv1d_bidirectional  # noqa: E402
from visionzoo.ops.reversed_attention import reversed_attention  # noqa: E402
from visionzoo.ops.selective_scan import selective_scan, selective_scan_bidirectional  # noqa: E402


def main() -> None:
    assert visionzoo.__file__.startswith(ROOT), f"imported {visionzoo.__file__}, not from {ROOT}"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    b, E, L, N = 1, 8, 4, 4
    u, delta = torch.randn(b, 2 * E, L), torch.randn(b, 2 * E, L)
    A, B, C = -torch.rand(2 * E, N), torch.randn(b, 2, N, L), torch.randn(b, 2, N, L)
    D, z, bias = torch.randn(2 * E), torch.randn(b, E, L), torch.randn(2 * E)
    x, w, wb = torch.randn(b, E, L), torch.randn(2 * E, 4), torch.randn(2 * E)
    q = torch.randn(1, 2, 5, 4)
    cases = {
        "selective_scan": lambda: selective_scan(u, delta, A, B, C, D, None, bias, True),
        "selective_scan_bidirectional": lambda: selective_scan_bidirectional(u, delta, A, B, C, D, z, bias, True,
                                                                             reversed_inputs=True),
        "causal_conv1d_bidirectional": lambda: causal_conv1d_bidirectional(x, w, wb, "silu"),
        "reversed_attention": lambda: reversed_attention(q, q, q),
    }
    import visionzoo.ops.selective_scan as scan_ops

    if hasattr(scan_ops, "bimamba_inner"):  # the Vim mixer entry (a Vim-Ti layer), its fused C call stubbed out
        import timm

        mixer = timm.create_model("test_vim").blocks[0].mixer
        xz = torch.randn(1, 197, 2 * mixer.A_log.shape[0])
        branches = [scan_ops.MambaBranch(mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D),
                    scan_ops.MambaBranch(mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)]
        scan_ops.bimamba_inner_cpu = lambda xz, forward, backward: xz
        cases["bimamba_inner (kernel stubbed)"] = lambda: scan_ops.bimamba_inner(xz, *branches)
    with torch.no_grad():
        for name, fn in cases.items():
            for _ in range(200):
                fn()
            best = float("inf")
            for _ in range(7):
                t = time.process_time()
                for _ in range(500):
                    fn()
                best = min(best, (time.process_time() - t) / 500)
            print(f"{name:30s} {best * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
