"""One helper for the tests that run a CPU kernel at several intra-op thread counts."""
from __future__ import annotations

from typing import Callable, Iterable, List, TypeVar

import torch

T = TypeVar("T")


def at_thread_counts(fn: Callable[[], T], counts: Iterable[int] = (1, 2, 3)) -> List[T]:
    """``[fn() with torch.set_num_threads(n) for n in counts]``; torch's thread count is restored after."""
    previous = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(previous)
