"""Input checks shared by the ops' public entries (each entry keeps the shape rules of its own op)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def check_tensors(op: str, named: Sequence[tuple[str, Optional[Tensor]]], kind: str = "floating point") -> None:
    """Each ``(name, tensor)`` of ``named`` (None tensors skipped; the first must be given) is a real
    floating point ``torch.Tensor`` on the device of the first one; otherwise one line, ``"<op>: <what>"``,
    as a ``TypeError`` (not a tensor) or ``ValueError``. ``kind`` words the dtype rule in that line."""
    first_name, first = named[0]
    for name, x in named:
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise ValueError(f"{op}: complex {name} is not supported (real tensors only)")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a {kind} tensor, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {first_name} is on {first.device}")
