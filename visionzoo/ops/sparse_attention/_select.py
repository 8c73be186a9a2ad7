"""Top-k with one tie rule in every runtime: where the ``k``-th largest value ties with values left out, the
lowest indices are kept.

``torch.topk`` leaves the choice among tied values unspecified (on CPU it kept the higher indices in the cases
measured here); ONNX ``TopK`` specifies the lower index, and so does the C key selection
(:mod:`._keys_cpu`). Sparsifiner selects coefficients and keys from near-uniform scores (random init) where
exact fp32 ties do occur, so without one rule eager and onnxruntime kept different keys
(``benchmarks/export_cpu.md``, Sparsifiner section).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._dispatch import aten_only_enabled, tracing


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``(..., k)`` of the ``k`` largest entries along the last dimension, exact ties at the cut to the
    lowest indices (order within the result unspecified).

    Eager on CPU: one ``topk``, and a stable sort only for the rows where a value equal to the ``k``-th was left out
    (rare). Traced for ONNX (``visionzoo.ops.aten_only``): ``topk``, which the exporter writes as ONNX ``TopK``
    (ONNX has no stable sort). Other traces (``torch.export``, compile) and devices other than the CPU (meta;
    CUDA, where a branch on the values would wait for the device): the stable sort for tied rows, selected
    without data-dependent control flow.
    """
    if aten_only_enabled():
        return scores.topk(k, dim=-1).indices
    values, idx = scores.topk(k, dim=-1, sorted=False)
    kth = values.amin(dim=-1, keepdim=True)
    # (...,): a value left out equals the k-th (everything left out is <= it), i.e. the cut splits a tie
    tied = (scores >= kth).sum(dim=-1, dtype=torch.int32) > k
    if tracing() or scores.device.type != "cpu":  # no values to branch on (meta), or no host sync (CUDA)
        stable = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.where(tied.unsqueeze(-1), stable, idx)
    if bool(tied.any()):
        idx = idx.clone()
        idx[tied] = scores[tied].sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return idx
