"""``build_data(cfg)``: dataset list -> split -> cached preprocessing -> patch loaders.

Batches come from MONAI's ``list_data_collate``: a training batch holds
``cfg.batch_size`` volumes x ``cfg.samples_per_volume`` patches, i.e.
``image`` ``(B, 1, *patch_size)`` float32 and ``label`` ``(B, 1, *patch_size)`` float32 in {0, 1}
with ``B = batch_size * samples_per_volume`` (the last batch may be smaller), plus ``case_id`` and
``site`` lists of length B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from monai.data import DataLoader, Dataset, list_data_collate

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


def build_data(cfg: DataConfig) -> DataBundle:
    """Read ``cfg.root``, split by ``cfg.source_sites`` and build the loaders.

    Training patches' randomness follows torch's global seed (MONAI's DataLoader seeds the
    transforms from it), so seed torch before calling for a reproducible run.
    """
    cfg.validate()
    info = load_dataset(cfg.root)
    split = split_cases(info.cases, cfg.source_sites, cfg.val_fraction, cfg.split_seed)
    folder = cache_dir_for(cfg)
    train_ds = cached_dataset(split.train, cfg, random_transform=train_transforms(cfg), cache_dir=folder,
                              label_values=info.label_values)
    val_volumes = cached_dataset(split.val, cfg, cache_dir=folder, label_values=info.label_values)
    val_patches = SeededDataset(val_volumes, val_patch_transforms(cfg), seed=cfg.split_seed)
    workers = int(cfg.num_workers)
    common = dict(num_workers=workers, collate_fn=list_data_collate, persistent_workers=workers > 0)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, **common)
    val_patch_loader = DataLoader(val_patches, batch_size=cfg.batch_size, shuffle=False, **common)
    return DataBundle(split=split, train_loader=train_loader, val_patch_loader=val_patch_loader,
                      val_volumes=val_volumes)
