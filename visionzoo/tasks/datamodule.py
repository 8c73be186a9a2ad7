"""Data loaders for Lightning: a ``DistributedSampler`` made here for every world size.

Lightning's automatic sampler replacement is off (``use_distributed_sampler=False``): the training
sampler is always ``DistributedSampler(num_replicas=world_size, rank=rank, seed=seed)``, which
Lightning re-seeds each epoch through ``set_epoch``. The order of batches is then a function of
(seed, epoch) only, the same in a fresh run and in a resumed one, and a 1-process run is the
``world_size=1`` case of the multi-process one. Random augmentations in worker processes draw from
per-worker seeds; exact resume equality holds for the deterministic demo data (and for real data
with ``num_workers=0``).
"""
from __future__ import annotations

from typing import Any, Dict

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..data import DataBundle


class DataModule(pl.LightningDataModule):
    def __init__(self, data: DataBundle, cfg: Dict[str, Any], seed: int = 0):
        super().__init__()
        self.data = data
        self.cfg = cfg
        self.seed = seed

    def _loader(self, dataset, train: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=self.seed,
                                     drop_last=train)
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(
            dataset, batch_size=int(self.cfg.get("batch_size", 32) if train else self.cfg.get("val_batch_size") or
                                    self.cfg.get("batch_size", 32)),
            sampler=sampler, num_workers=workers, collate_fn=self.data.collate_fn, drop_last=train,
            pin_memory=bool(self.cfg.get("pin_memory", False)), persistent_workers=workers > 0,
            # the loader draws its workers' base seed from this generator, not from the global RNG, so
            # creating an iterator does not shift the global stream that a resumed run restores
            generator=torch.Generator().manual_seed(self.seed + 7919 * rank),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data.val, train=False)
