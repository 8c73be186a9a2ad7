"""The ``cpu`` backend's C backward (``_cpu_bwd``) against the ``reference`` backend's autograd."""
import itertools

import pytest
import torch

from visionzoo.ops.selective_scan import _cpu_bwd, selective_scan
from visionzoo.ops.selective_scan._chunked import selective_scan_chunked_backward
from visionzoo.ops.selective_scan._reference import selective_scan_reference

from ._threads import at_thread_counts

needs_kernel = pytest.mark.skipif(_cpu_bwd.load() is None, reason="no C compiler on this machine")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
RTOL, ATOL = 6e-4, 2e-3


def make(batch=2, dim=12, length=7, dstate=5, groups=2, *, D=True, z=True, bias=True, last=True,
         grad_out=True, layout="contiguous", softplus=True, seed=0):
    """fp32 inputs, output / last-state gradients, in one of the layouts the op sees.

    ``layout``: ``"contiguous"``; ``"time_major"``: ``u, delta, z, grad_out`` as ``(b, d, L)`` views of
    ``(L, b, d)`` memory and ``B, C`` as views of ``(L, b, G, N)`` memory; ``"channels_last"``: views of
    ``(b, L, d)`` memory (Vim's tokens) and ``B, C`` slices of a larger ``(b, L, G * 2N)`` tensor;
    ``"strided"``: every tensor a view of every other step of a twice-as-long one (no unit stride).
    Without ``softplus``, delta is made positive (a negative step makes the state grow exponentially).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length) * 0.5 - 0.5 if softplus else rand(batch, dim, length).abs() * 0.5,
        "A": -torch.exp(rand(dim, dstate) * 0.5),
        "B": rand(batch, groups, dstate, length),
        "C": rand(batch, groups, dstate, length),
        "D": rand(dim) if D else None,
        "z": rand(batch, dim, length) if z else None,
        "delta_bias": rand(dim) * 0.1 if bias else None,
    }
    gout = rand(batch, dim, length) if grad_out else None
    glast = rand(batch, dim, dstate) if last else None
    seq = ["u", "delta", "z"]
    if layout == "time_major":
        for k in seq:
            if x[k] is not None:
                x[k] = x[k].permute(2, 0, 1).contiguous().permute(1, 2, 0)
        for k in ("B", "C"):
            x[k] = x[k].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
        if gout is not None:
            gout = gout.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    elif layout == "channels_last":
        for k in seq:
            if x[k] is not None:
                x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        big = rand(batch, length, groups, 2 * dstate)  # B, C interleaved in one tensor, as from x_proj
        big[..., :dstate] = x["B"].permute(0, 3, 1, 2)
        big[..., dstate:] = x["C"].permute(0, 3, 1, 2)
        x["B"], x["C"] = big[..., :dstate].permute(0, 2, 3, 1), big[..., dstate:].permute(0, 2, 3, 1)
        if gout is not None:
            gout = gout.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        def every_other_step(t):
            return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
        x = {k: (every_other_step(v) if v is not None and v.dim() >= 3 else v) for k, v in x.items()}
        gout = every_other_step(gout) if gout is not None else None
    return x, gout, glast


def reference_grads(x, softplus, gout, glast):
    """Autograd through the reference scan (fp32); None for absent inputs, zeros for unused ones."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    out, last = selective_scan_reference(*(leaves[k] for k in NAMES), delta_softplus=softplus)
    outputs, weights = [], []
    for o, w in ((out, gout), (last, glast)):
        if w is not None:
            outputs.append(o)
            weights.append(w)
    present = [leaves[k] for k in NAMES if leaves[k] is not None]
    grads = iter(torch.autograd.grad(outputs, present, weights, materialize_grads=True))
    return [next(grads) if leaves[k] is not None else None for k in NAMES]


def cpu_grads(x, softplus, gout, glast):
    return _cpu_bwd.selective_scan_cpu_backward(*(x[k] for k in NAMES), softplus, gout, glast)


def check(actual, expected, what=""):
    for name, a, e in zip(NAMES, actual, expected):
        if e is None:
            assert a is None, f"{what} {name}: expected None"
            continue
        assert a is not None, f"{what} {name}: got None"
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what} {name}: {a.shape} {a.dtype}"
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} grad {name}: {m}")


@needs_kernel
@pytest.mark.parametrize("opts", list(itertools.product([False, True], repeat=5)))
def test_all_option_combinations(opts):
    """D, z, delta_bias, softplus and grad_last_state on and off; layouts alternate across the cases."""
    D, z, bias, softplus, last = opts
    layout = ("contiguous", "time_major", "channels_last", "strided")[sum(opts) % 4]
    x, gout, glast = make(dim=12, length=9, groups=2, D=D, z=z, bias=bias, last=last, layout=layout,
                          softplus=softplus, seed=sum(2 ** i * o for i, o in enumerate(opts)))
    check(cpu_grads(x, softplus, gout, glast), reference_grads(x, softplus, gout, glast), f"{opts} {layout}")


@needs_kernel
@pytest.mark.parametrize("length", [1, 7, 67, 130])
@pytest.mark.parametrize("dim,groups,dstate", [(20, 1, 16), (36, 2, 5), (9, 1, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "time_major", "strided"])
def test_lengths_groups_layouts(length, dim, groups, dstate, layout):
    """Odd lengths (130 spans several of the kernel's 32-step chunks), ragged channel blocks, G = 1, 2."""
    x, gout, glast = make(dim=dim, length=length, dstate=dstate, groups=groups, layout=layout, seed=length + dim)
    check(cpu_grads(x, True, gout, glast), reference_grads(x, True, gout, glast), f"L={length} {layout}")


@needs_kernel
def test_only_one_output_differentiated():
    """grad_out None (only the last state is used), and grad_last_state None with z but no D."""
    x, _, glast = make(length=40, grad_out=False)
    check(cpu_grads(x, True, None, glast), reference_grads(x, True, None, glast), "last only")
    x, gout, _ = make(length=40, D=False, last=False, softplus=False)
    check(cpu_grads(x, False, gout, None), reference_grads(x, False, gout, None), "out only")


@needs_kernel
@pytest.mark.parametrize("dstate,groups,dim", [(1, 3, 18), (64, 2, 24)])
def test_state_sizes(dstate, groups, dim):
    """N = 1 (no group of four states) and N = 64; three groups."""
    x, gout, glast = make(dim=dim, length=45, dstate=dstate, groups=groups, seed=dstate)
    check(cpu_grads(x, True, gout, glast), reference_grads(x, True, gout, glast), f"N={dstate}")


@needs_kernel
def test_several_threads_agree():
    """Work split over threads: one item per (batch, group) pair, or slices of a group's channel blocks
    (with their dB, dC partial sums) when there are few pairs. The slicing depends on the shapes (and the
    build's block width: 16 channels with AVX-512, else 8) only, so 1, 2 and 3 threads give bitwise the same
    gradients."""
    lanes = _cpu_bwd.load().vz_scan_bwd_lanes()
    assert lanes in (8, 16)
    wide = lanes == 16
    cases = [(make(batch=3, dim=36, length=70, groups=2, seed=1), 2 if wide else 3),  # 6 pairs of 2 (3) blocks
             (make(batch=1, dim=40, length=70, groups=1, seed=2), 3 if wide else 5),  # 1 pair of 3 (5) blocks
             (make(batch=2, dim=36, length=33, groups=2, layout="time_major", seed=3), 2 if wide else 3),  # 4 pairs
             (make(batch=1, dim=12, length=20, groups=2, seed=4), 1),  # 2 pairs of 1 block: cannot split
             (make(batch=8, dim=64, length=40, groups=2, seed=5), 1)]  # 16 pairs: whole
    for (x, gout, glast), splits in cases:
        batch, dim, groups = x["u"].shape[0], x["u"].shape[1], x["B"].shape[1]
        assert _cpu_bwd._splits(batch, groups, dim // groups) == splits
        runs = at_thread_counts(lambda: cpu_grads(x, True, gout, glast))
        check(runs[0], reference_grads(x, True, gout, glast), f"{splits} slices")
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert (a is None and b is None) or torch.equal(a, b)


@needs_kernel
def test_more_slices_than_blocks(monkeypatch):
    """Slices with no channel block still write (zero) dB, dC partial sums."""
    monkeypatch.setattr(_cpu_bwd, "_splits", lambda batch, groups, dg: 5)
    x, gout, glast = make(batch=2, dim=36, length=40, groups=2)  # 3 blocks per group
    check(cpu_grads(x, True, gout, glast), reference_grads(x, True, gout, glast), "5 slices")


@needs_kernel
def test_op_backward_runs_the_kernel(monkeypatch):
    """selective_scan(..., backend="cpu").backward() reaches the C backward kernel (not a fallback)."""
    calls = []
    real = _cpu_bwd._backward_op

    def counting(*args):
        calls.append("vz_selective_scan_bwd")
        return real(*args)

    monkeypatch.setattr(_cpu_bwd, "_backward_op", counting)
    x, gout, _ = make(batch=2, dim=12, length=21, groups=2)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    selective_scan(**leaves, delta_softplus=True, backend="cpu").backward(gout)
    assert calls.count("vz_selective_scan_bwd") == 1, calls
    expected = reference_grads(x, True, gout, None)
    check([leaves[k].grad for k in NAMES], expected, "through the op")


@needs_kernel
def test_fallbacks_give_the_chunked_backward(monkeypatch):
    x, gout, glast = make(length=15)
    args = (*(x[k] for k in NAMES), True, gout, glast)
    want = selective_scan_chunked_backward(*args)
    monkeypatch.setattr(_cpu_bwd, "load", lambda: None)  # no compiler / failed build
    for a, b in zip(_cpu_bwd.selective_scan_cpu_backward(*args), want):
        torch.testing.assert_close(a, b)
    monkeypatch.undo()
    x64 = {k: v.double() for k, v in x.items()}  # fp64: not the kernel's dtype
    got = _cpu_bwd.selective_scan_cpu_backward(*(x64[k] for k in NAMES), True, gout.double(), glast.double())
    assert all(g.dtype == torch.float64 for g in got)
    check([g.float() for g in got], want, "fp64")


@needs_kernel
def test_opcheck():
    """The kernel's opaque custom op: schema, fake kernel (shapes, strides), aot dispatch."""
    for layout in ("contiguous", "time_major"):
        for D, z, bias in ((True, True, True), (False, False, False)):
            x, gout, glast = make(length=10, D=D, z=z, bias=bias, layout=layout)
            args = (*(x[k] for k in NAMES), True, gout, glast)
            torch.library.opcheck(torch.ops.visionzoo.selective_scan_cpu_backward.default, args)


@needs_kernel
def test_vim_tiny_size_against_chunked():
    """One Vim-Tiny-sized call (batch 1, dim 768, L 197, N 16, G 2, time-major) against chunked's backward."""
    x, gout, _ = make(batch=1, dim=768, length=197, dstate=16, groups=2, last=False, layout="time_major")
    args = (*(x[k] for k in NAMES), True, gout, None)
    check(_cpu_bwd.selective_scan_cpu_backward(*args), selective_scan_chunked_backward(*args), "vim-tiny")


@needs_kernel
@pytest.mark.parametrize("batch,dim,length,groups,layout", [
    (2, 36, 70, 2, "contiguous"),   # ragged channel blocks, 3 chunks (the last short)
    (1, 48, 64, 1, "time_major"),   # exactly two chunks
    (3, 12, 5, 3, "contiguous"),    # one short chunk, 4 channels per group
])
def test_forward_checkpoints_replace_the_recompute(batch, dim, length, groups, layout):
    """The backward started from the forward's state checkpoints matches the reference (and the backward that
    recomputes them)."""
    from visionzoo.ops.selective_scan import _cpu

    x, gout, glast = make(batch=batch, dim=dim, length=length, groups=groups, layout=layout, seed=dim)
    args = [x[k] for k in NAMES]
    _, _, ck = _cpu.selective_scan_cpu(*args, delta_softplus=True, checkpoints=True)
    assert tuple(ck.shape) == _cpu.checkpoint_shape(batch, dim, length, 5)
    with_ck = _cpu_bwd.selective_scan_cpu_backward(*args, True, gout, glast, ck)
    check(with_ck, reference_grads(x, True, gout, glast), "checkpoints")
    for a, b in zip(with_ck, cpu_grads(x, True, gout, glast)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoints of shape"):
        _cpu_bwd.selective_scan_cpu_backward(*args, True, gout, glast, ck[..., :1])


@needs_kernel
def test_bidirectional_checkpoints_match_the_stacked_scan():
    """The bidirectional forward's checkpoints are the stacked scan's (backward half in its reversed order)."""
    from visionzoo.ops.selective_scan import _cpu

    x, gout, _ = make(batch=1, dim=48, length=70, groups=2, seed=9)
    u, delta, A, B, C, D, z, bias = (x[k] for k in NAMES)
    E = 24
    zs = z[:, :E]
    _, _, ck = _cpu.selective_scan_bidirectional_cpu(u, delta, A, B, C, D, zs, bias, True, "mean", checkpoints=True)
    stacked_z = torch.cat([zs, zs.flip(-1)], dim=1)
    _, _, ck_stacked = _cpu.selective_scan_cpu(u, delta, A, B, C, D, stacked_z, bias, True, checkpoints=True)
    assert torch.equal(ck, ck_stacked)


@needs_kernel
@pytest.mark.parametrize("groups,last", [(1, False), (2, True)])
def test_bidirectional_kernel_in_vim_layout(groups, last):
    """``selective_scan_bidirectional_cpu_backward`` (one call per direction, the shared gate and the output
    gradient read backwards in place) against autograd through the reference composition, and its op's
    schema / fake kernel."""
    torch.manual_seed(0)
    batch, E, L, N = 2, 24, 45, 5
    u = torch.randn(batch, L, 2 * E).transpose(1, 2)
    delta = torch.randn(batch, L, 2 * E).transpose(1, 2) * 0.5
    A = -torch.rand(2 * E, N) - 0.3
    B, C = (torch.randn(batch, L, 2 * groups, N).permute(0, 2, 3, 1) for _ in range(2))
    D, bias, z = torch.randn(2 * E), torch.randn(2 * E) * 0.2, torch.randn(batch, L, E).transpose(1, 2)
    gout, glast = torch.randn(batch, E, L), (torch.randn(batch, 2 * E, N) if last else None)
    inputs = (u, delta, A, B, C, D, z, bias)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    u_, d_, A_, B_, C_, D_, z_, b_ = leaves
    flip = lambda t: t.flip(-1)  # noqa: E731
    G = groups
    yf, hf = selective_scan_reference(u_[:, :E], d_[:, :E], A_[:E], B_[:, :G], C_[:, :G], D_[:E], z_, b_[:E], True)
    yb, hb = selective_scan_reference(u_[:, E:], d_[:, E:], A_[E:], B_[:, G:], C_[:, G:], D_[E:], flip(z_), b_[E:],
                                      True)
    loss = ((yf + flip(yb)) * 0.5 * gout).sum()
    if last:
        loss = loss + (torch.cat([hf, hb], 1) * glast).sum()
    want = torch.autograd.grad(loss, leaves)
    got = _cpu_bwd.selective_scan_bidirectional_cpu_backward(*inputs, True, gout, 0.5, glast)
    for g, w, name in zip(got, want, NAMES):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    torch.library.opcheck(torch.ops.visionzoo.selective_scan_bidirectional_cpu_backward.default,
                          (*inputs, True, gout, 0.5, glast))


@needs_kernel
def test_vim_training_hands_the_forward_checkpoints_to_the_backward(monkeypatch):
    """Under autograd the bidirectional cpu forward keeps its state checkpoints for the backward, which gives
    bitwise the gradients it gets by recomputing them; without autograd nothing is kept."""
    from visionzoo.ops.selective_scan import _bidirectional, selective_scan_bidirectional

    torch.manual_seed(0)
    batch, E, L, N = 2, 16, 70, 4
    base = [torch.randn(batch, L, 2 * E).transpose(1, 2), torch.randn(batch, L, 2 * E).transpose(1, 2) * 0.5,
            -torch.rand(2 * E, N) - 0.3, *(torch.randn(batch, L, 2, N).permute(0, 2, 3, 1) for _ in range(2)),
            torch.randn(2 * E), torch.randn(batch, L, E).transpose(1, 2), torch.randn(2 * E)]
    seen, drop = [], []
    real = _cpu_bwd.selective_scan_bidirectional_cpu_backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args[:-1], None) if drop else real(*args)

    monkeypatch.setattr(_cpu_bwd, "selective_scan_bidirectional_cpu_backward", spy)

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in base]
        out = selective_scan_bidirectional(*leaves[:6], z=leaves[6], delta_bias=leaves[7], delta_softplus=True,
                                           reversed_inputs=True, backend="cpu")
        return torch.autograd.grad(out.square().sum(), leaves)

    handed = grads()
    assert seen[-1] is not None and tuple(seen[-1].shape) == (batch, 3, N, 2 * E)
    drop.append(True)
    recomputed = grads()
    for a, b in zip(handed, recomputed):
        assert torch.equal(a, b)
    with torch.no_grad():
        selective_scan_bidirectional(*base[:6], z=base[6], delta_bias=base[7], delta_softplus=True,
                                     reversed_inputs=True, backend="cpu")
    assert not _bidirectional._CHECKPOINTS


@needs_kernel
@pytest.mark.parametrize("forward_checkpoints", [True, False])
def test_dt_proj_folded_in(forward_checkpoints):
    """With ``dt_w`` the forward and the backward compute delta = dt_w @ dt (Mamba's dt_proj) inside the kernels
    from the low-rank factor (batch, 2, R, L): the same results, within rounding, as the kernels given that delta
    materialised; with or without the forward's checkpoints (the backward's own checkpoint pass folds it too)."""
    from visionzoo.ops.selective_scan import _cpu

    torch.manual_seed(0)
    batch, E, L, N, R = 2, 40, 70, 6, 5  # E = 40: 16-lane blocks and a ragged one; R not a multiple of 4
    u = torch.randn(batch, L, 2 * E).transpose(1, 2)
    x_dbl = torch.randn(batch, L, 2, R + 2 * N)
    dt_low, B, C = (x_dbl[..., s].permute(0, 2, 3, 1) for s in (slice(0, R), slice(R, R + N), slice(R + N, None)))
    dt_w = torch.randn(2 * E, R) * R ** -0.5
    delta = torch.cat([torch.einsum("er,brl->bel", dt_w[k * E:(k + 1) * E], dt_low[:, k]) for k in range(2)], 1)
    A = -torch.rand(2 * E, N) - 0.3
    D, bias, z = torch.randn(2 * E), torch.randn(2 * E) * 0.2 - 1, torch.randn(batch, L, E).transpose(1, 2)
    gout = torch.randn(batch, E, L)

    def run(d, w):
        out, last, ck = _cpu.selective_scan_bidirectional_cpu(u, d, A, B, C, D, z, bias, True, "mean",
                                                              checkpoints=True, dt_w=w)
        grads = _cpu_bwd.bidirectional_backward(u, d, A, B, C, D, z, bias, True, gout, 0.5, None,
                                                ck if forward_checkpoints else None, dt_w=w)
        return (out, last, ck) + tuple(grads)

    for got, want in zip(run(dt_low, dt_w), run(delta, None)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
