"""``build_data(cfg)``: dataset list -> split -> cached preprocessing -> patch loaders.

Batches come from MONAI's ``list_data_collate``: a training batch holds
``cfg.batch_size`` volumes x ``cfg.samples_per_volume`` patches, i.e.
``image`` ``(B, 1, *patch_size)`` float32 and ``label`` ``(B, 1, *patch_size)`` float32 in {0, 1}
with ``B = batch_size * samples_per_volume`` (the last batch may be smaller), plus ``case_id`` and
``site`` lists of length B.

Reproducible at epoch granularity, with or without loader workers and under DDP: a training item's
random patches are a function of ``(seed, epoch, pass, index)`` only (:class:`EpochSeededDataset`,
keyed by the engine each epoch), and the shuffle of the plain loader follows its own ``generator``,
which the engine reseeds per ``(seed, epoch, rank)``. Nothing depends on how many epochs ran in this
process nor on which worker made an item, so a resumed epoch replays the very same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from torch.utils.data import DistributedSampler

from dualssl.config import DataConfig
from dualssl.data.cache import cache_dir_for, cached_dataset
from dualssl.data.datalist import Split, load_dataset, split_cases
from dualssl.data.transforms import train_transforms, val_patch_transforms


@dataclass
class DataBundle:
    """Everything a training run reads.

    ``train_loader``: shuffled, augmented patch batches (see the module docstring).
    ``val_patch_loader``: the same patch sampling on the validation cases, without augmentation and
    with a fixed seed per case, so every epoch scores the very same patches (a cheap Dice).
    ``val_volumes``: whole preprocessed validation volumes, items ``{"image": (1,X,Y,Z) float32,
    "label": (1,X,Y,Z) uint8, "case_id": str, "site": str, ...}`` (MetaTensors, invertible with
    :func:`dualssl.data.transforms.invert_to_input`).
    """

    split: Split
    train_loader: DataLoader
    val_patch_loader: DataLoader
    val_volumes: Dataset


class SeededDataset(Dataset):
    """Applies a random transform re-seeded from ``seed + index``: item i is the same every epoch,
    in every worker."""

    def __init__(self, data: Any, transform: Callable, seed: int) -> None:
        super().__init__(data=data, transform=transform)
        self.seed = int(seed)

    def _transform(self, index: int) -> Any:
        self.transform.set_random_state(seed=(self.seed + index) % (2**32))
        return super()._transform(index)


class EpochSeededDataset(Dataset):
    """Applies a random transform re-seeded per item from ``(seed, epoch, pass, index)``.

    The key lives in shared memory, so :meth:`set_epoch` in the main process reaches persistent
    workers too (a worker only starts on an epoch's items after the loader's next ``iter``). Item
    ``index`` thus gets the same patches whichever worker, rank or process makes it. MONAI's
    transforms draw from their own ``R`` (reseeded here); transforms drawing from torch's global RNG
    see it seeded per item too, inside ``fork_rng`` so the caller's stream is left as it was.
    """

    def __init__(self, data: Any, transform: Callable) -> None:
        super().__init__(data=data, transform=transform)
        self._key = torch.zeros(3, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, *, seed: int = 0, pass_index: int = 0) -> None:
        """Key the coming items: ``pass_index`` counts the loader's passes within the epoch."""
        self._key.copy_(torch.tensor([int(seed), int(epoch), int(pass_index)], dtype=torch.int64))

    def item_seed(self, index: int) -> int:
        keys = [int(k) % 2**64 for k in self._key.tolist()] + [int(index)]
        return int(np.random.SeedSequence(keys).generate_state(1)[0])

    def _transform(self, index: int) -> Any:
        seed = self.item_seed(index)
        self.transform.set_random_state(seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return super()._transform(index)


def shard_loader(loader: DataLoader, rank: int, world_size: int, seed: int) -> DataLoader:
    """``loader`` over this rank's shard: a ``DistributedSampler(shuffle=True, seed=seed)`` (call its
    ``set_epoch``) and otherwise the same dataset, batching, workers and generator."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      persistent_workers=loader.persistent_workers, generator=loader.generator,
                      worker_init_fn=loader.worker_init_fn, drop_last=loader.drop_last)


def build_data(cfg: DataConfig) -> DataBundle:
    """Read ``cfg.root``, split by ``cfg.source_sites`` and build the loaders.

    Training patches and shuffle follow the keys the engine sets each epoch (module docstring);
    before the first key they are those of ``(seed 0, epoch 0)``.
    """
    cfg.validate()
    info = load_dataset(cfg.root)
    split = split_cases(info.cases, cfg.source_sites, cfg.val_fraction, cfg.split_seed)
    folder = cache_dir_for(cfg)
    train_volumes = cached_dataset(split.train, cfg, cache_dir=folder, label_values=info.label_values)
    train_ds = EpochSeededDataset(train_volumes, train_transforms(cfg))
    val_volumes = cached_dataset(split.val, cfg, cache_dir=folder, label_values=info.label_values)
    val_patches = SeededDataset(val_volumes, val_patch_transforms(cfg), seed=cfg.split_seed)
    workers = int(cfg.num_workers)
    common = dict(num_workers=workers, collate_fn=list_data_collate, persistent_workers=workers > 0)
    # Own generators: the shuffle (and workers' base seeds) follow the engine's per-epoch reseed, and
    # iterating the loaders leaves torch's global RNG (the loss's corruptions) untouched.
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator(),
                              **common)
    val_patch_loader = DataLoader(val_patches, batch_size=cfg.batch_size, shuffle=False,
                                  generator=torch.Generator(), **common)
    return DataBundle(split=split, train_loader=train_loader, val_patch_loader=val_patch_loader,
                      val_volumes=val_volumes)
