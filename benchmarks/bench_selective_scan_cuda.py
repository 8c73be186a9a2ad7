"""Selective-scan kernels on CUDA at Vim-S size: Triton vs mamba-ssm's ``selective_scan_fn`` vs ``chunked``.

Two groups of rows, for bf16 and fp32 inputs (A, D, delta_bias fp32; delta_softplus; D and z given):

``one direction``: one scan of ``(batch, E, L)`` with ``B, C`` ``(batch, N, L)`` (Vim-S: E = 768, L = 197,
N = 16), forward and forward + backward (gradients of every input):

* ``triton``: ``selective_scan(..., backend="triton")`` (Triton forward and backward kernels);
* ``mamba_ssm``: mamba-ssm's ``selective_scan_fn`` called directly -- the issue's bar is triton
  fwd+bwd <= 1.2x this;
* ``chunked``: the pure-PyTorch backend.

``both directions`` (one Vim-S mixer's scans: ``u, delta`` ``(B, 2E, L)`` with the backward half already
time-reversed, ``B, C`` ``(B, 2, N, L)``, one shared ``z`` ``(B, E, L)``):

* ``triton bidirectional``: ``selective_scan_bidirectional(..., reversed_inputs=True, backend="triton")``
  (one forward launch, one backward launch);
* ``mamba_ssm x2 (official Vim)``: two ``selective_scan_fn`` calls (forward half; backward half with
  ``z.flip``), then ``(y + y_b.flip) / 2``, as the official Vim code does;
* ``bidirectional mamba`` / ``bidirectional chunked``: ``selective_scan_bidirectional`` on those backends
  (one plain scan of the 2E stacked channels).

Each row gets the memory layout its model uses (printed): mamba-ssm rows L-contiguous ``(B, C, L)`` as
in the official Vim (no copies in its kernel), visionzoo rows time-major (``(L, B, C)`` in memory, the
Linear layers' output as visionzoo's Vim feeds it). Columns: milliseconds per call (CUDA events, mean
of ``--reps`` after a warm-up call that also compiles the Triton kernels), the peak memory that
forward + backward allocates on top of its inputs, and the max error of ``out`` and of all gradients
relative to the same case in fp32 on ``chunked`` (max |diff| / max |ref|). Rows whose backend is
missing (no mamba_ssm, no Triton) print "not available" and are skipped.

Usage (< 60 s on one H200 including Triton compilation)::

    python benchmarks/bench_selective_scan_cuda.py
    python benchmarks/bench_selective_scan_cuda.py --batch 64 --dim 768 --length 197 --reps 20
    TRITON_INTERPRET=1 python benchmarks/bench_selective_scan_cuda.py --device cpu --batch 1 --dim 8 \\
        --length 9 --dstate 4 --reps 1     # smoke test of the script itself (Triton's interpreter)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visionzoo.ops import is_available  # noqa: E402
from visionzoo.ops.selective_scan import selective_scan, selective_scan_bidirectional  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
LOW = ("u", "delta", "B", "C", "z")  # cast to the benchmark dtype; A, D, delta_bias stay fp32


def make_one(batch, dim, length, dstate, device, groups=1, seed=0):
    """One direction, fp32 master copies: u, delta, z (batch, dim, L); B, C (batch, N, L) or (batch, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    bc = (batch, dstate, length) if groups == 1 else (batch, groups, dstate, length)
    return dict(u=r(batch, dim, length), delta=r(batch, dim, length, scale=0.5) - 1.0,
                A=-torch.exp(r(dim, dstate, scale=0.5)), B=r(*bc), C=r(*bc),
                D=r(dim), z=r(batch, dim, length), delta_bias=r(dim, scale=0.1))


def make_bi(batch, dim, length, dstate, device, seed=1):
    """Both directions as BiMambaMixer lays them out: (B, L, 2E) activations seen as (B, 2E, L)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    return dict(u=r(batch, 2 * dim, length), delta=r(batch, 2 * dim, length, scale=0.5) - 1.0,
                A=-torch.exp(r(2 * dim, dstate, scale=0.5)), B=r(batch, 2, dstate, length),
                C=r(batch, 2, dstate, length), D=r(2 * dim), z=r(batch, dim, length),
                delta_bias=r(2 * dim, scale=0.1))


def cast(x, dtype, time_major):
    """The sequence tensors in the benchmark dtype and layout: ``time_major`` stores u, delta, z as
    (L, B, C) in memory (visionzoo's Vim: Linear outputs seen as (B, C, L)); otherwise L-contiguous (the
    official Vim's layout, what mamba-ssm's kernel reads without copying)."""
    out = {}
    for k, v in x.items():
        if k in LOW:
            if time_major and k in ("u", "delta", "z"):
                v = torch.empty((v.shape[2], v.shape[0], v.shape[1]), dtype=dtype, device=v.device).copy_(
                    v.permute(2, 0, 1)).permute(1, 2, 0)
            else:
                v = v.to(dtype).contiguous()
        out[k] = v
    return out


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn, reps):
        fn()  # warm-up (compiles Triton kernels on first use)
        sync(self.device)
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3


def mamba_fn():
    """mamba_ssm's ``selective_scan_fn`` (the official fused kernel), or None when mamba_ssm does not import."""
    if not is_available("selective_scan", "mamba", "cuda"):
        return None
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def one_direction_cases(device):
    fn = mamba_fn() if device == "cuda" else None

    def ours(backend):
        def call(x):
            return selective_scan(**x, delta_softplus=True, backend=backend)
        return call if is_available("selective_scan", backend, device) else None

    def mamba(x):
        return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True)

    # (name, call, time-major layout)
    return [("triton", ours("triton"), True),
            ("mamba_ssm selective_scan_fn", mamba if fn is not None else None, False),
            ("chunked", ours("chunked"), True)]


def both_direction_cases(device):
    fn = mamba_fn() if device == "cuda" else None

    def ours(backend):
        def call(x):
            return selective_scan_bidirectional(**x, delta_softplus=True, reversed_inputs=True, backend=backend)
        return call if is_available("selective_scan", backend, device) else None

    def mamba_x2(x):  # the official Vim: two scans, the second on the flipped sequence, outputs averaged
        E = x["u"].shape[1] // 2
        h = [slice(0, E), slice(E, 2 * E)]
        outs = []
        for k, z in ((0, x["z"]), (1, x["z"].flip(-1))):
            outs.append(fn(x["u"][:, h[k]], x["delta"][:, h[k]], x["A"][h[k]], x["B"][:, k], x["C"][:, k],
                           x["D"][h[k]], z, x["delta_bias"][h[k]], delta_softplus=True))
        return (outs[0] + outs[1].flip(-1)) * 0.5

    return [("triton bidirectional (1 launch)", ours("triton"), True),
            ("mamba_ssm x2 + flips (official Vim)", mamba_x2 if fn is not None else None, False),
            ("bidirectional, mamba backend", ours("mamba"), True),
            ("bidirectional, chunked", ours("chunked"), True)]


def forward_backward(call, x, w):
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
    out = call(leaves)
    out.backward(w.to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_group(title, cases, master, dtypes, args, timer):
    print(f"## {title}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in master.items() if k in ("u", "B", "z")))
    device = args.device
    ref_call = next(c for n, c, _ in cases if "chunked" in n)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out_shape = ref_call(master).shape
    w = torch.randn(out_shape, generator=g).to(device)
    ref_out, ref_grads = forward_backward(ref_call, master, w)  # fp32 chunked
    results = {}
    for dtype in dtypes:
        for name, call, time_major in cases:
            x = cast(master, dtype, time_major)
            label = f"{str(dtype).replace('torch.', ''):8s} {name:36s} {'(L,B,C)' if time_major else '(B,C,L)'}"
            if call is None:
                print(f"{label} not available")
                continue
            try:
                reps = args.reps if "chunked" not in name else max(1, args.reps // 5)

                def fwd(call=call, x=x):
                    with torch.no_grad():
                        return call(x)

                t_f = timer(fwd, reps)
                out, grads = forward_backward(call, x, w)
                err_out = rel_err(out, ref_out)
                err_g = max(rel_err(grads[k], ref_grads[k]) for k in NAMES)
                mem = "-"
                if device == "cuda":
                    del out, grads
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    forward_backward(call, x, w)
                    torch.cuda.synchronize()
                    mem = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:7.1f} MiB"
                t_fb = timer(lambda call=call, x=x: forward_backward(call, x, w), max(1, reps // 2))
                results[(dtype, name)] = t_fb
                print(f"{label} fwd {t_f:8.3f} ms  fwd+bwd {t_fb:8.3f} ms  peak {mem}  "
                      f"err out {err_out:.1e} grads {err_g:.1e}")
            except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                print(f"{label} FAILED: {type(e).__name__}: {e}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=768, help="channels per direction (Vim-S: 2 * 384)")
    ap.add_argument("--length", type=int, default=197)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--groups", type=int, default=1, help="B/C groups of the one-direction rows")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test (triton needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtypes.split(",")]
    device = args.device
    t0 = time.perf_counter()
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, mamba_ssm: {mamba_fn() is not None}, "
              f"triton: {is_available('selective_scan', 'triton', 'cuda')}")
    timer = Timer(device)
    sizes = (args.batch, args.dim, args.length, args.dstate)
    r1 = run_group("one direction", one_direction_cases(device), make_one(*sizes, device, args.groups), dtypes,
                   args, timer)
    r2 = run_group("both directions (one Vim mixer)", both_direction_cases(device), make_bi(*sizes, device),
                   dtypes, args, timer)
    for dtype in dtypes:
        for res, a, b in ((r1, "triton", "mamba_ssm selective_scan_fn"),
                          (r2, "triton bidirectional (1 launch)", "mamba_ssm x2 + flips (official Vim)")):
            if (dtype, a) in res and (dtype, b) in res:
                print(f"{str(dtype).replace('torch.', '')}: {a} / {b} fwd+bwd time = "
                      f"{res[(dtype, a)] / res[(dtype, b)]:.2f} (bar: <= 1.2)")
    print(f"# done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
