"""Bi-level routing attention (BRA), the token mixer of BiFormer, with interchangeable backends.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023,
arXiv 2303.08810; official code https://github.com/rayleizhu/BiFormer (MIT), ``ops/bra_legacy.py``.

Semantics (the official checkpoint-compatible ``bra_legacy``, ``kv_downsample_mode='identity'``):

1. The ``(H, W)`` token grid is cut into ``n_h x n_w`` regions of ``(H/n_h) x (W/n_w)`` tokens
   (``S2 = n_h * n_w`` regions of ``w2`` tokens; the official code has ``n_h = n_w = n_win``).
2. Routing: region means ``q_r``, ``k_r`` (over all channels), logits ``(q_r * scale) @ k_r^T``
   ``(S2 x S2)``, and the ``topk`` key regions of every query region. Routing is not differentiated.
3. Every token of a query region attends, with ``num_heads`` heads, to all ``topk * w2`` tokens of its
   routed regions: ``softmax((q * scale) k^T) v``.

``scale`` is ``C_qk ** -0.5`` in BiFormer, the full query/key width rather than the head width — a
quirk of the released models that their weights depend on; it is a required argument here.

Backends (``backend=``, or ``auto``; ``VISIONZOO_BACKEND_ROUTING_ATTENTION`` overrides ``auto``; declared
in ``_op.ROUTING``):

``reference``
    The official algorithm: gathers a ``topk``-fold redundant K/V tensor, dense attention per region.
    It runs as plain autograd ops (not through the custom op), so training keeps the official memory
    behaviour as well; FLOP counters see its matmuls directly.
``chunked``
    Pure PyTorch, ``auto``'s choice off CUDA: works on the spatial tensors through strided views, and per
    chunk of query-region rows gathers the routed K/V tokens and runs fused SDPA; on small grids (routed
    keys >= 2/7 of all tokens, e.g. stage 3 at 224 and 448) one SDPA call with the routing as a token mask
    instead; recomputing backward. Extra memory is a few MiB per chunk whatever ``topk`` (see
    :mod:`._chunked`).
``triton``
    A Triton kernel that fuses the gather into flash attention, forward and backward (the backward
    walks the inverse routing per key region: no atomics, deterministic). ``auto``'s choice on CUDA for
    float32/float16/bfloat16 — chosen without a GPU measurement here; ``chunked`` stays the fallback
    (float64, no Triton). On CPU it runs only in Triton's interpreter (``TRITON_INTERPRET=1``), for
    tests (see :mod:`._triton`).

The ops ``torch.ops.visionzoo.bi_level_routing_attention`` (chunked) and
``torch.ops.visionzoo.bi_level_routing_attention_triton`` run on the meta device, are counted by
``FlopCounterMode`` (:func:`routing_attention_flops`) and are differentiable in ``q``, ``k`` and ``v``.
"""
from __future__ import annotations

from typing import Tuple, Union

from torch import Tensor

from ._op import BACKENDS, ROUTING, flops as _flops

__all__ = ["bi_level_routing_attention", "routing_attention_flops", "BACKENDS"]


def routing_attention_flops(batch: int, n_win: Union[int, Tuple[int, int]], region_tokens: int, topk: int,
                            c_qk: int, c_v: int) -> int:
    """FLOPs (a multiply-add counts 2) of one BRA call: routing matmul plus the two attention matmuls."""
    n_h, n_w = (n_win, n_win) if isinstance(n_win, int) else n_win
    return _flops(batch, n_h, n_w, region_tokens, topk, c_qk, c_v)


def bi_level_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    n_win: Union[int, Tuple[int, int]],
    topk: int,
    scale: float,
    *,
    return_routing: bool = False,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Bi-level routing attention on channels-last token grids.

    Args:
        q, k: ``(B, H, W, C_qk)`` queries and keys.
        v: ``(B, H, W, C_v)`` values.
        num_heads: heads ``m``; ``C_qk`` and ``C_v`` are split head-major into ``m`` chunks.
        n_win: regions per side, ``n`` or ``(n_h, n_w)``; ``H % n_h == W % n_w == 0`` (pad first).
        topk: routed key regions per query region, ``1 <= topk <= n_h * n_w``.
        scale: softmax scale for the routing logits and the token attention.
        return_routing: also return the routing indices ``(B, n_h * n_w, topk)``; regions are numbered
            row-major over the ``n_h x n_w`` grid.
        backend: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"triton"``.

    Returns:
        ``(B, H, W, C_v)`` in ``v``'s dtype (and the routing indices if asked).
    """
    ROUTING.check_name(backend, "bi_level_routing_attention")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"bi_level_routing_attention: {name} must be a 4-d (B, H, W, C) tensor, "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"bi_level_routing_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must share (B, H, W), and k must match q")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("bi_level_routing_attention: q, k and v must share dtype and device")
    n_h, n_w = (n_win, n_win) if isinstance(n_win, int) else tuple(n_win)
    B, H, W, c_qk = q.shape
    if n_h < 1 or n_w < 1 or H % n_h or W % n_w:
        raise ValueError(f"bi_level_routing_attention: a {H}x{W} grid cannot be cut into {n_h}x{n_w} "
                         f"regions; H and W must be multiples of n_win (pad first)")
    if num_heads < 1 or c_qk % num_heads or v.shape[-1] % num_heads:
        raise ValueError(f"bi_level_routing_attention: C_qk={c_qk} and C_v={v.shape[-1]} must be "
                         f"divisible by num_heads={num_heads}")
    if not 1 <= topk <= n_h * n_w:
        raise ValueError(f"bi_level_routing_attention: topk={topk} must be in [1, {n_h * n_w}] "
                         f"({n_h}x{n_w} regions)")
    args = (q, k, v, int(num_heads), int(n_h), int(n_w), int(topk), float(scale))
    out, idx = ROUTING.dispatch(backend, q, lambda b: b.forward(*args))
    return (out, idx) if return_routing else out
