"""Selective-scan backends on CUDA at Vim-Ti size: triton vs chunked vs mamba (if importable).

Times the forward and forward + backward of ``visionzoo.ops.selective_scan`` (batch 64, dim 768, L 197,
N 16, G 2, with D, z, delta_bias, softplus) and prints the max error of each backend against ``chunked``.
Run by ``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import time

import torch

from visionzoo.ops.selective_scan import _op, selective_scan


def make(batch, dim, length, dstate, groups, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device)

    x = dict(u=r(batch, dim, length), delta=r(batch, dim, length) * 0.5, A=-torch.exp(r(dim, dstate) * 0.5),
             B=r(batch, groups, dstate, length), C=r(batch, groups, dstate, length), D=r(dim),
             z=r(batch, dim, length), delta_bias=r(dim) * 0.1)
    return {k: (v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--length", type=int, default=197)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test (triton needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = args.device
    for dtype in (torch.float32, torch.bfloat16):
        x = make(args.batch, args.dim, args.length, args.dstate, args.groups, dtype, dev)
        base = None
        for backend in ("chunked", "triton", "mamba"):
            if not _op.is_available(backend, dev):
                print(f"{dtype} {backend:8s} not available")
                continue
            leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}

            def fwd():
                with torch.no_grad():
                    return selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)

            def fwd_bwd():
                for v in leaves.values():
                    v.grad = None
                out = selective_scan(**leaves, delta_softplus=True, backend=backend)
                out.float().square().sum().backward()

            try:
                out, _ = fwd()
                if base is None:
                    base = out.float()
                err = (out.float() - base).abs().max().item() / base.abs().max().item()
                t_f = timed(fwd, args.reps)
                t_fb = timed(fwd_bwd, max(1, args.reps // 2))
                print(f"{dtype} {backend:8s} fwd {t_f:8.2f} ms  fwd+bwd {t_fb:8.2f} ms  rel.err vs chunked {err:.2e}")
            except Exception as e:  # noqa: BLE001 - report and go on with the other backends
                print(f"{dtype} {backend:8s} FAILED: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
