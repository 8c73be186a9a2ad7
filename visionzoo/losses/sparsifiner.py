"""Sparsifiner's training objectives (Wei et al., CVPR 2023; lim142857/Sparsifiner, MIT, ``losses.py``).

Two pieces:

* :func:`attn_self_distill_loss` + :func:`attach_aux_loss`: the official ``ATTN_SELF_DISTILL`` term,
  applied inside every block's sparse forward while training (``attn_self_distill_weight``, on by
  default). The key mask is detached, so without this term a plain ``loss.backward()`` would leave the
  connectivity predictors without gradient (and DDP would stop on "unused parameters"). The term is
  attached to the block output, so any backward through the model trains the predictors, and only them
  (its inputs and target are detached from the backbone).
* :class:`SparsifinerDistillLoss`: the two phases of the released recipe, for a training loop that
  runs them (predictor warm-up, then sparse fine-tuning against a dense teacher).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparsifinerDistillLoss", "attach_aux_loss", "attn_self_distill_loss"]


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient 1 into ``loss``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def attach_aux_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, with ``loss`` added to whatever is back-propagated through it: an auxiliary loss
    that trains what it depends on in any backward (the pattern MoE layers use for balancing losses)."""
    return _AttachAuxLoss.apply(x, loss)


def attn_self_distill_loss(approx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
                           weight: float) -> torch.Tensor:
    """Official ``ATTN_SELF_DISTILL``: ``weight * sum((approx - softmax(q k^T * scale)[:, :, 1:])**2)``.

    approx: ``(B, H, N-1, N)`` the predictor's approximation for every query but the class token;
    q, k: ``(B, H, N, d)`` the block's own queries and keys; the dense map is the (detached) target.
    """
    with torch.no_grad():
        target = ((q[:, :, 1:] @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return F.mse_loss(approx, target, reduction="sum") * weight


class SparsifinerDistillLoss(nn.Module):
    """The two training phases of the released recipe (``sparsifiner_default_config.yaml``, ``losses.py``).

    ``phase="attn_recon"`` (epochs 0-4; optimise only ``*mask_predictor*`` parameters): the student runs
    dense (``mode="recon"``) and each block's approximation ``coef @ basis`` (signed basis, all
    coefficients) is regressed on the dense attention map without its class row:
    ``attn_recon_weight * mean_blocks(sum((approx - attn[:, :, 1:])**2))``. The target is the student's
    own dense map, detached: in this phase the backbone is frozen at the teacher's weights, so it is
    the teacher's map, without running a teacher.

    ``phase="cls_distill"`` (epochs 5-49; optimise everything but the predictors): ``cls_weight * CE(logits,
    target) + cls_distill_weight * KL(student || teacher logits, batchmean) + token_distill_weight *
    MSE(tokens, teacher tokens)``; ``teacher`` is any module with ``forward_distill`` (e.g. a frozen copy of
    the model run with ``mode="dense"``). Token distillation is skipped after token pruning unless the
    teacher pruned identically (the official code then compares only the kept rows).

    ``forward(model, images, target)`` returns ``(loss, parts)`` with the weighted terms in ``parts``.
    """

    def __init__(self, phase: str = "cls_distill", teacher: Optional[nn.Module] = None,
                 base_criterion: Optional[nn.Module] = None, cls_weight: float = 1.0, cls_distill_weight: float = 0.5,
                 token_distill_weight: float = 0.5, attn_recon_weight: float = 0.01):
        super().__init__()
        if phase not in ("attn_recon", "cls_distill"):
            raise ValueError(f"SparsifinerDistillLoss: phase must be 'attn_recon' or 'cls_distill', got {phase!r}")
        if phase == "cls_distill" and teacher is None:
            raise ValueError("SparsifinerDistillLoss: phase 'cls_distill' needs a dense teacher")
        self.phase = phase
        self.teacher = teacher
        self.base_criterion = base_criterion or nn.CrossEntropyLoss()
        self.weights = dict(cls=cls_weight, cls_distill=cls_distill_weight, token_distill=token_distill_weight,
                            attn_recon=attn_recon_weight)

    def forward(self, model: nn.Module, images: torch.Tensor, target: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        w = self.weights
        if self.phase == "attn_recon":
            out = model.forward_distill(images, mode="recon")
            terms = [F.mse_loss(a, t[:, :, 1:].detach(), reduction="sum") for a, t in zip(out["approx"], out["attn"])]
            parts = {"attn_recon": w["attn_recon"] * torch.stack(terms).mean()}
            return parts["attn_recon"], parts
        out = model.forward_distill(images, mode="sparse")
        with torch.no_grad():
            ref = self.teacher.forward_distill(images, mode="dense")
        parts = {
            "cls": w["cls"] * self.base_criterion(out["logits"], target),
            "cls_distill": w["cls_distill"] * F.kl_div(F.log_softmax(out["logits"], -1),
                                                       F.log_softmax(ref["logits"], -1),
                                                       reduction="batchmean", log_target=True),
        }
        if out["tokens"].shape == ref["tokens"].shape:
            parts["token_distill"] = w["token_distill"] * F.mse_loss(out["tokens"], ref["tokens"])
        return sum(parts.values()), parts
