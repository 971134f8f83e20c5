"""Where the contrastive samples come from: the pancreas skeleton (positives) and the ring around it (negatives).

Everything runs in NumPy on the CPU on the label only; the expensive part is one separable box
dilation at full resolution, the rest works on the tiny bottleneck grid (1/8 per axis).

Downsampling rule (documented choice): a bottleneck cell counts as pancreas when it holds any
pancreas voxel (max-pool). Its 3D skeleton lies on the organ's medial axis, so the sampled cells
are mostly pancreas (on the NIH case resampled to 1.5x1.5x2 mm and cut into 96x96x64 patches the
sampled cells are ~65 % pancreas by volume, and a patch yields ~3 positives), whereas a majority
rule (avg-pool > 0.5) leaves no axial slice with ``min_pos_voxels=10`` cells on such patches.
A cell counts as ring (negative) when it holds ring voxels and no pancreas voxel at all.
``min_pos_voxels`` and ``min_neg_voxels`` are counted per axial slice (last axis) ON THE BOTTLENECK
GRID, as in the follow-up's code (which thresholded its pooled masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

DOWNSAMPLE = 8
"""Bottleneck stride of the backbone."""


@dataclass(frozen=True)
class StructureSamples:
    """Sampled bottleneck cells of a batch: ``index (N, 4)`` rows ``(b, x, y, z)`` and ``is_pancreas (N,)``."""

    index: np.ndarray
    is_pancreas: np.ndarray

    @property
    def num_pos(self) -> int:
        return int(self.is_pancreas.sum())

    @property
    def num_neg(self) -> int:
        return int((~self.is_pancreas).sum())


def _pool_any(mask: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` bool -> ``(X/8, Y/8, Z/8)``: True where the 8x8x8 cell holds any True voxel."""
    x, y, z = (s // DOWNSAMPLE for s in mask.shape)
    cells = mask[: x * DOWNSAMPLE, : y * DOWNSAMPLE, : z * DOWNSAMPLE]
    return cells.reshape(x, DOWNSAMPLE, y, DOWNSAMPLE, z, DOWNSAMPLE).any(axis=(1, 3, 5))


def _one_per_slice(candidates: np.ndarray, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random True voxel of ``candidates (x, y, z)`` per axial slice where ``eligible[z]``; ``(n, 3)``."""
    picks = []
    for z in np.flatnonzero(eligible):
        xy = np.argwhere(candidates[..., z])
        if len(xy):
            px, py = xy[rng.integers(len(xy))]
            picks.append((px, py, z))
    return np.asarray(picks, dtype=np.int64).reshape(-1, 3)


def positive_cells(mask_low: np.ndarray, min_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """Skeleton positives: ``mask_low (x, y, z)`` bool -> ``(n, 3)`` cells, one per slice with >= min_voxels cells."""
    if not mask_low.any():
        return np.zeros((0, 3), dtype=np.int64)
    skeleton = skeletonize(mask_low).astype(bool)
    eligible = mask_low.sum(axis=(0, 1)) >= min_voxels
    return _one_per_slice(skeleton, eligible, rng)


def negative_cells(ring_low: np.ndarray, min_voxels: int, rng: np.random.Generator) -> np.ndarray:
    """Ring negatives: ``ring_low (x, y, z)`` bool -> ``(n, 3)``, one point of each eligible slice's 2D skeleton."""
    eligible = ring_low.sum(axis=(0, 1)) >= min_voxels
    skeleton = np.zeros_like(ring_low)
    for z in np.flatnonzero(eligible):
        skeleton[..., z] = skeletonize(ring_low[..., z])
    return _one_per_slice(skeleton, eligible, rng)


def ring_mask(mask: np.ndarray, k: int) -> np.ndarray:
    """Peri-pancreatic ring at full resolution: dilation by a k x k x (k-3) box minus the mask (both ``(X, Y, Z)``)."""
    dilated = ndimage.maximum_filter(mask, size=(k, k, max(k - 3, 1)), mode="constant", cval=False)
    return dilated & ~mask


def sample_volume(mask: np.ndarray, *, ring_kernel: tuple[int, int], min_pos_voxels: int,
                  min_neg_voxels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative bottleneck cells of one label ``mask (X, Y, Z)`` bool.

    Returns ``(pos (P, 3), neg (N, 3))`` integer ``(x, y, z)`` indices on the ``X/8, Y/8, Z/8`` grid.
    k of the ring is drawn uniformly from ``ring_kernel`` (inclusive).
    """
    if not mask.any():
        empty = np.zeros((0, 3), dtype=np.int64)
        return empty, empty
    mask_low = _pool_any(mask)
    k = int(rng.integers(ring_kernel[0], ring_kernel[1] + 1))
    # Only the label's bounding box grown by k can hold ring voxels: dilate that crop (whole cells), not the patch.
    where = np.argwhere(mask)
    full = np.array(mask.shape) // DOWNSAMPLE * DOWNSAMPLE
    lo = np.maximum(where.min(0) - k, 0) // DOWNSAMPLE * DOWNSAMPLE
    hi = np.minimum(-(-(where.max(0) + k + 1) // DOWNSAMPLE) * DOWNSAMPLE, full)
    ring_low = np.zeros_like(mask_low)
    ring_low[tuple(slice(a // DOWNSAMPLE, b // DOWNSAMPLE) for a, b in zip(lo, hi))] = _pool_any(
        ring_mask(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], k))
    ring_low &= ~mask_low
    return (positive_cells(mask_low, min_pos_voxels, rng),
            negative_cells(ring_low, min_neg_voxels, rng))


def sample_batch(label: torch.Tensor, *, ring_kernel: tuple[int, int], min_pos_voxels: int,
                 min_neg_voxels: int, rng: np.random.Generator) -> StructureSamples:
    """Structure samples of a label batch ``(B, 1, X, Y, Z)`` (any device, values {0, 1}; X, Y, Z multiples of 8)."""
    if label.dim() != 5 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, X, Y, Z), got shape {list(label.shape)}")
    masks = (label[:, 0] > 0.5).cpu().numpy()
    rows, kinds = [], []
    for b, mask in enumerate(masks):
        pos, neg = sample_volume(mask, ring_kernel=ring_kernel, min_pos_voxels=min_pos_voxels,
                                 min_neg_voxels=min_neg_voxels, rng=rng)
        for cells, is_pos in ((pos, True), (neg, False)):
            rows.append(np.concatenate([np.full((len(cells), 1), b, dtype=np.int64), cells], axis=1))
            kinds.append(np.full(len(cells), is_pos))
    return StructureSamples(np.concatenate(rows).reshape(-1, 4), np.concatenate(kinds).astype(bool))
