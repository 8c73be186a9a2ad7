"""Peak memory of tensors created inside a code region, on any device (CPU included).

``torch.cuda.max_memory_allocated`` has no CPU counterpart and process RSS mixes in the allocator's
caching, so this counts storages directly: a ``TorchDispatchMode`` adds the bytes of every new
tensor storage an op returns and subtracts them when the storage is freed, keeping the peak.
Inputs and parameters that exist before the region are not counted; autograd's saved tensors are.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """``with PeakLiveBytes() as t: ...`` then ``t.peak`` is the peak of live bytes created inside."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self._live:
                    nbytes = storage.nbytes()
                    self._live[id(storage)] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, id(storage), nbytes)
        return out
