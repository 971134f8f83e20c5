"""Local self-supervision: corrupt blobs of the uncertainty band, restore the clean image there.

The protocol (why it looks like this):

* **No label shortcut.** The band comes from the GROUND-TRUTH label, so a corrupted image shows
  where the boundary is. The corrupted image is therefore only ever the input of a second,
  restoration-only forward; segmentation and contrastive losses see the clean patch
  (``dualssl.losses.composite`` and ``Trainer.train_step``).
* **A crop keeps the second forward cheap.** The restoration forward runs on a crop of side
  ``loss.rec_crop`` x the patch side per axis (rounded to a multiple of 8, at least 8), centred on
  a random band voxel of each sample and clamped into the patch; only that crop is corrupted.
  A whole second forward+backward (``rec_crop=1``) doubles the network's work; half a side
  (``rec_crop=0.5``, the default) adds 1/8 of it, which is what keeps dual/plain near the 1.25
  budget of ``benchmarks/step_cost.py`` (``--rec-crops 1,0.75,0.5`` measures the choice; on the
  heavily shared 2-core CPU the figures were too noisy to quote, see the report of this change).
* **r means what it says.** ``corruption_ratio`` r is the fraction of the crop's band voxels whose
  value ACTUALLY changes (``|corrupted - clean| > CHANGE_EPS``). ``select_voxels`` picks
  ``round(r * |band|)`` voxels in blobs; the Models Genesis chain leaves a few of them (almost)
  unchanged (a near-identity Bezier stretch, a shuffle that draws the voxel itself or an equal
  neighbour), and those get a noise value at least ``CHANGE_EPS`` away from the clean one, so
  the realised ratio is r up to rounding. The mask returned is the changed voxels, and the
  restoration loss averages over exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dualssl.losses.corruptions import corrupt_batch, corrupt_batch_reference, select_voxels, select_voxels_reference
from dualssl.losses.uncertainty import uncertainty_region

DRIVERS = {"device": (select_voxels, corrupt_batch), "reference": (select_voxels_reference, corrupt_batch_reference)}
"""Voxel selection and corruption per loss backend (``dualssl.losses.corruptions``)."""

CHANGE_EPS = 1e-3
"""A voxel counts as corrupted when some channel moved by more than this (images are in [0, 1];
on the default HU window it is ~0.3 HU)."""


@dataclass(frozen=True)
class Corrupted:
    """The restoration branch's share of one batch (crop sizes ``x, y, z`` multiples of 8).

    * ``image`` ``(B, C, x, y, z)``: the corrupted crop, input of the restoration forward only;
    * ``clean`` ``(B, C, x, y, z)``: the same crop of the clean patch (the target);
    * ``mask`` ``(B, 1, x, y, z)`` bool: the voxels whose value changed (> ``CHANGE_EPS``);
    * ``region_voxels`` ``(B,)``: band (uncertainty region) voxels inside each crop;
    * ``origin`` ``(B, 3)`` long: where each crop starts in the patch.
    """

    image: torch.Tensor
    clean: torch.Tensor
    mask: torch.Tensor
    region_voxels: torch.Tensor
    origin: torch.Tensor

    @property
    def changed_voxels(self) -> torch.Tensor:
        """``(B,)`` number of changed voxels per sample."""
        return self.mask.flatten(1).sum(dim=1)

    @property
    def realised_ratio(self) -> torch.Tensor:
        """Scalar: changed voxels / band voxels over the batch (NaN when no crop holds band)."""
        region = self.region_voxels.sum()
        return torch.where(region > 0, self.changed_voxels.sum() / region.clamp_min(1), torch.nan)


def crop_size(patch: Sequence[int], fraction: float) -> tuple[int, int, int]:
    """Side per axis of the restoration crop: ``fraction * n`` rounded to a multiple of 8, in ``[8, n]``;
    ``fraction == 1`` is the whole patch whatever its size (e.g. a whole volume)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"loss.rec_crop: must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return tuple(int(n) for n in patch)  # type: ignore[return-value]
    return tuple(min(int(n), max(8, int(round(fraction * n / 8)) * 8)) for n in patch)  # type: ignore[return-value]


def crop_origins(region: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop starts ``(B, 3)`` long: centred on one random region voxel per sample (the patch centre
    when a sample has none), clamped so the crop of ``size`` lies inside the patch. No host sync
    (and no host-to-device copy: the sizes enter as Python scalars)."""
    b, _, *patch = region.shape
    flat = region.reshape(b, -1)
    score = torch.rand(flat.shape, device=region.device) * flat  # 0 outside the region
    pick = score.argmax(dim=1)
    centre = (pick // (patch[1] * patch[2]), pick // patch[2] % patch[1], pick % patch[2])
    has = flat.any(dim=1)
    return torch.stack([(torch.where(has, c, n // 2) - s // 2).clamp(min=0, max=n - s)
                        for c, n, s in zip(centre, patch, size)], dim=1)


def take_crops(volume: torch.Tensor, origin: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Per-sample crops: ``volume (B, C, X, Y, Z)``, ``origin (B, 3)`` -> ``(B, C, *size)`` (gather, no sync)."""
    b = volume.shape[0]
    axes = [origin[:, i, None] + torch.arange(n, device=volume.device) for i, n in enumerate(size)]  # (B, n)
    batch = torch.arange(b, device=volume.device)[:, None, None, None]
    out = volume[batch, :, axes[0][:, :, None, None], axes[1][:, None, :, None], axes[2][:, None, None, :]]
    return out.permute(0, 4, 1, 2, 3)  # advanced indices first: (B, x, y, z, C) -> (B, C, x, y, z)


def force_change(clean: torch.Tensor, corrupted: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Give every ``chosen`` voxel that the corruption left within ``CHANGE_EPS`` a uniform noise value
    at least ``2 * CHANGE_EPS`` away from its clean value (uniform on the circle [0, 1) minus that gap).

    ``clean``, ``corrupted`` ``(B, C, X, Y, Z)`` in [0, 1]; ``chosen`` ``(B, 1, X, Y, Z)`` bool.
    """
    still = chosen & ((corrupted - clean).abs().amax(dim=1, keepdim=True) <= CHANGE_EPS)
    gap = 2 * CHANGE_EPS
    noise = torch.remainder(clean + gap + torch.rand_like(clean) * (1 - 2 * gap), 1.0)
    return torch.where(still, noise, corrupted)


def corrupt_region(image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], *, ratio: float,
                   band_mm: float, crop: float = 1.0, probs: torch.Tensor | None = None,
                   entropy_threshold: float = 0.5, backend: str = "device") -> Corrupted:
    """Crop around the high-uncertainty region and corrupt a fraction ``ratio`` of its band voxels there.

    Args:
        image: ``(B, C, X, Y, Z)`` in [0, 1] (the clean patch; not modified).
        label: ``(B, 1, X, Y, Z)`` in {0, 1}.
        spacing: voxel size in mm ``(X, Y, Z)`` (band width).
        crop: side of the crop as a fraction of the patch side per axis (1 = the whole patch).
        probs: optional ``(B, K, X, Y, Z)`` probabilities; high-entropy voxels widen the region.
        backend: ``"device"`` (no host sync: ``select_voxels``, ``corrupt_batch``) or ``"reference"``
            (the original ``select_voxels_reference``, ``corrupt_batch_reference``).
    Returns:
        :class:`Corrupted`; its image equals the clean crop outside ``mask``.
    """
    if image.dim() != 5 or label.dim() != 5 or label.shape[1] != 1 or image.shape[0] != label.shape[0] \
            or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image (B, C, X, Y, Z) {list(image.shape)} and label (B, 1, X, Y, Z) "
                         f"{list(label.shape)} do not match")
    region = uncertainty_region(label, spacing, band_mm, probs=probs, entropy_threshold=entropy_threshold)
    size = crop_size(image.shape[2:], crop)
    if tuple(size) == tuple(image.shape[2:]):
        origin = torch.zeros(image.shape[0], 3, dtype=torch.long, device=image.device)
        clean = image
    else:
        origin = crop_origins(region, size)
        clean, region = take_crops(image, origin, size), take_crops(region, origin, size)
    if backend not in DRIVERS:
        raise ValueError(f"backend: choose one of {', '.join(DRIVERS)}, got {backend!r}")
    select, corrupt = DRIVERS[backend]
    chosen = select(region, ratio)
    corrupted = force_change(clean, corrupt(clean, chosen), chosen)
    mask = (corrupted - clean).abs().amax(dim=1, keepdim=True) > CHANGE_EPS
    return Corrupted(corrupted, clean, mask, region.flatten(1).sum(dim=1), origin)


def restoration_loss(restored: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                     kind: str = "l1") -> torch.Tensor:
    """Mean L1 (or squared) error between ``restored`` and ``clean`` over the voxels of ``mask``.

    Args:
        restored, clean: ``(B, C, X, Y, Z)``.
        mask: ``(B, 1, X, Y, Z)`` bool (the changed voxels).
    Returns:
        scalar float32; an exact zero with a zero-gradient path when the mask is empty.
    """
    if restored.shape != clean.shape:
        raise ValueError(f"restored {list(restored.shape)} and clean image {list(clean.shape)} differ in shape")
    if mask.shape[0] != clean.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != clean.shape[2:]:
        raise ValueError(f"corrupt_mask must be (B, 1, X, Y, Z) matching {list(clean.shape)}, got {list(mask.shape)}")
    if kind not in ("l1", "mse"):
        raise ValueError(f"loss.rec_loss: choose 'l1' or 'mse', got {kind!r}")
    m = mask.expand_as(clean).float()
    diff = restored.float() - clean.float()
    err = diff.abs() if kind == "l1" else diff ** 2
    # masked sum over a clamped count: no host sync, and an exact zero (zero gradient) when empty
    return (err * m).sum() / m.sum().clamp_min(1.0)
