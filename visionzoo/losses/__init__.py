"""Training objectives that belong to a family's recipe rather than to its model file."""
from .sparsifiner import SparsifinerDistillLoss, attach_aux_loss, attn_self_distill_loss

__all__ = ["SparsifinerDistillLoss", "attach_aux_loss", "attn_self_distill_loss"]
