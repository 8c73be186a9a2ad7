"""FlexAttention plumbing shared by the ``flex`` backends (``ops/<op>/_flex.py``).

``torch.nn.attention.flex_attention`` is PyTorch's own attention with a programmable mask: under
``torch.compile`` it becomes a maintained, block-sparse Triton kernel on CUDA (forward and backward)
and a compiled C++ kernel on CPU (first compile ~20 s per shape). A ``flex`` backend describes its
sparsity as a :class:`~torch.nn.attention.flex_attention.BlockMask`: which ``BLOCK x BLOCK`` tiles of the
score matrix hold any kept connection (computed), which hold only kept ones (no ``mask_mod`` call), and a
``mask_mod`` that gives the exact token-level mask inside the partial tiles. The block layout is built
here straight from the op's own indices (routing indices, key sets), never from a dense evaluation of
``mask_mod`` over ``(Q, KV)``.

On CPU ``auto`` never picks ``flex`` (the compile cost dominates); ask for it by name.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

BLOCK = 128  # tile of the block mask (the default of create_block_mask; a multiple of the kernels' tiles)
_compiled: dict[str, Callable] = {}


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when FlexAttention can run on ``device_type``, else why not."""
    try:
        from torch.nn.attention import flex_attention as _fa  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an older torch
        return f"torch.nn.attention.flex_attention is unavailable ({type(exc).__name__}: {exc})"
    if device_type not in ("cuda", "cpu"):
        return f"FlexAttention does not run on device type {device_type!r}"
    return None


def cannot_run(x: Tensor, **facts) -> Optional[str]:
    """None when a ``flex`` backend can run for inputs like ``x`` (the op's leading tensor), else why not:
    FlexAttention has no CPU backward (torch refuses CPU inputs that require grad)."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
        return "FlexAttention has no CPU backward (inputs require grad); it runs on CPU for inference only"
    return None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> Tensor:
    """``flex_attention`` under ``torch.compile`` (eager flex is a slow dense fallback). ``q``/``k``
    ``(B, H, L, d)``, ``v`` ``(B, H, L, d_v)``. CPU compiles one kernel per shape: Inductor's C++ flex
    kernel with dynamic sizes fails to build (torch 2.14), so the automatic dynamic-shape recompile is off
    there."""
    device_type = q.device.type
    fn = _compiled.get(device_type)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention as fa

        fn = _compiled[device_type] = torch.compile(fa, dynamic=False if device_type == "cpu" else None)
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def block_mask(partial: Tensor, full: Optional[Tensor], mask_mod: Callable, q_len: int, kv_len: int):
    """A ``BlockMask`` from tile flags ``partial`` (tiles that need ``mask_mod``) and ``full`` (tiles kept
    whole), each ``(B, H or 1, cdiv(q_len, BLOCK), cdiv(kv_len, BLOCK))`` bool (``full`` may be None)."""
    from torch.nn.attention.flex_attention import BlockMask

    def layout(flags: Tensor) -> tuple[Tensor, Tensor]:
        num = flags.sum(-1, dtype=torch.int32)
        # Indices of the set tiles first, in column order (stable sort of the flags, descending).
        order = torch.argsort(flags.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, order.contiguous()

    kv_num, kv_idx = layout(partial)
    full_num, full_idx = layout(full) if full is not None else (None, None)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def token_blocks(length: int, group: int, device) -> Tensor:
    """``(cdiv(length, BLOCK), cdiv(length, group))`` float incidence: tile ``i`` holds a token of group ``g``
    (tokens ``g * group .. (g + 1) * group - 1``)."""
    tokens = torch.arange(length, device=device)
    inc = torch.zeros(-(-length // BLOCK), -(-length // group), device=device)
    inc[tokens // BLOCK, tokens // group] = 1.0
    return inc
