"""Where the contrastive samples come from: the pancreas skeleton (positives) and the ring around it (negatives).

Two implementations of the same sampling:

* **on the device** (``sample_cells``, the training default): torch ops on the label's device,
  batched over B, with fixed-size outputs and no host round trip (no ``.cpu()``, ``.item()``,
  ``nonzero``): the ring is a per-sample box dilation by prefix sums, the skeletons are
  ``dualssl.losses.thinning.thin``, and each axial slice draws its cell by an argmax of uniform
  scores. It returns one slot per (sample, slice) and kind, with a ``valid`` flag.
* **the NumPy reference** (``sample_batch``, ``sample_volume``, ``positive_cells``, ``negative_cells``,
  ``ring_mask``): the original code, on the host, with SciPy's maximum filter and scikit-image's
  ``skeletonize`` (Lee's 3D thinning for positives, Zhang's 2D thinning per slice for negatives).

Both share the downsampling, the ring, the slice thresholds and "one uniform pick per eligible
slice". They differ in the skeletons only (documented choice, ``dualssl.losses.thinning``): ``thin``
is Lee's thinning with a parallel recheck order, which moves a few skeleton cells to a neighbouring
medial cell (by about as much as scikit-image's own skeleton moves when the volume is flipped),
and the device path thins the ring slices with the same (2D) Lee thinning instead of Zhang's, so
negatives come from the same slices, from a centreline of the ring that shares ~80 % of Zhang's
cells. On 80 MSD pancreas patches the device path gave 232 positive slots to the reference's 220
and the same 508 negative slots. ``tests/test_torch_sampling.py`` checks that everything else
selects exactly the same cells, and the skeletons against NumPy references of their own definition.

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

from dualssl.losses.thinning import thin

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


def ring_cells_reference(mask: np.ndarray, k: int) -> np.ndarray:
    """Ring cells of ``mask (X, Y, Z)`` bool: ``(X/8, Y/8, Z/8)`` bool, cells holding ``ring_mask(mask, k)``
    voxels and no pancreas voxel (``mask`` not empty)."""
    mask_low = _pool_any(mask)
    # Only the label's bounding box grown by k can hold ring voxels: dilate that crop (whole cells), not the patch.
    where = np.argwhere(mask)
    full = np.array(mask.shape) // DOWNSAMPLE * DOWNSAMPLE
    lo = np.maximum(where.min(0) - k, 0) // DOWNSAMPLE * DOWNSAMPLE
    hi = np.minimum(-(-(where.max(0) + k + 1) // DOWNSAMPLE) * DOWNSAMPLE, full)
    ring_low = np.zeros_like(mask_low)
    ring_low[tuple(slice(a // DOWNSAMPLE, b // DOWNSAMPLE) for a, b in zip(lo, hi))] = _pool_any(
        ring_mask(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], k))
    return ring_low & ~mask_low


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
    ring_low = ring_cells_reference(mask, k)
    return (positive_cells(mask_low, min_pos_voxels, rng),
            negative_cells(ring_low, min_neg_voxels, rng))


def sample_batch(label: torch.Tensor, *, ring_kernel: tuple[int, int], min_pos_voxels: int,
                 min_neg_voxels: int, rng: np.random.Generator) -> StructureSamples:
    """Structure samples of a label batch ``(B, 1, X, Y, Z)`` (any device, values {0, 1}; X, Y, Z multiples
    of 8), the NumPy reference: copies the label to the host."""
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


# --- on the device -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellSamples:
    """Sampled bottleneck cells of a batch, fixed size: one slot per (kind, sample, axial slice).

    ``index (S, 4)`` long rows ``(b, x, y, z)``; ``is_pancreas (S,)`` bool (the first ``S/2`` slots
    are positives); ``valid (S,)`` bool: the slot holds a cell (its slice is eligible and its skeleton
    crosses it); the rows of invalid slots are arbitrary cells, to be ignored. ``S = 2 * B * z``.
    """

    index: torch.Tensor
    is_pancreas: torch.Tensor
    valid: torch.Tensor

    @property
    def num_pos(self) -> torch.Tensor:
        """Scalar long tensor (on the device: reading it is a host sync)."""
        return (self.valid & self.is_pancreas).sum()

    @property
    def num_neg(self) -> torch.Tensor:
        return (self.valid & ~self.is_pancreas).sum()


def pool_any(mask: torch.Tensor) -> torch.Tensor:
    """``(B, X, Y, Z)`` bool -> ``(B, X/8, Y/8, Z/8)``: True where the 8x8x8 cell holds any True voxel."""
    b, *size = mask.shape
    x, y, z = (n // DOWNSAMPLE for n in size)
    cells = mask[:, : x * DOWNSAMPLE, : y * DOWNSAMPLE, : z * DOWNSAMPLE]
    return cells.reshape(b, x, DOWNSAMPLE, y, DOWNSAMPLE, z, DOWNSAMPLE).amax(dim=(2, 4, 6))


def _window_any(mask: torch.Tensor, dim: int, size: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Along ``dim`` of ``mask (B, ...)`` bool: any True in the window of ``size[b]`` voxels placed as
    SciPy's filters place it (offsets ``-(s // 2)`` to ``s - 1 - s // 2``), the outside False; with
    ``stride`` s > 1, output cell c covers the windows of input voxels ``s*c .. s*c + s - 1`` (the
    dilation then ``pool_any`` along ``dim``, one pass). Per-sample sizes ``size (B,)`` long, by prefix
    sums: two gathers, no loop over sizes."""
    n = mask.shape[dim]
    counts = mask.to(torch.int32).cumsum(dim=dim)
    counts = torch.cat([torch.zeros_like(counts.narrow(dim, 0, 1)), counts], dim=dim)  # counts[j] = sum of [0, j)
    start = torch.arange(0, n // stride * stride, stride, device=mask.device)[None, :]
    top = (start + stride + (size - 1 - size // 2)[:, None]).clamp(max=n)  # (B, n / stride): one past the end
    bottom = (start - (size // 2)[:, None]).clamp(min=0)
    shape = [1] * mask.dim()
    shape[0], shape[dim] = mask.shape[0], start.shape[1]
    index = [t.reshape(shape).expand(*mask.shape[:dim], start.shape[1], *mask.shape[dim + 1:]) for t in (top, bottom)]
    return counts.gather(dim, index[0]) > counts.gather(dim, index[1])


def box_dilate(mask: torch.Tensor, size: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Binary dilation of ``mask (B, X, Y, Z)`` bool by a box of ``size (B, 3)`` long voxels per sample
    (SciPy's ``maximum_filter(mask, size, mode="constant", cval=False)``, even sizes included);
    ``stride=DOWNSAMPLE`` gives ``pool_any`` of it, ``(B, X/8, Y/8, Z/8)``, at a fraction of the cost."""
    out = mask
    for axis in range(3):
        out = _window_any(out, axis + 1, size[:, axis], stride)
    return out


def ring_cells(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Ring cells ``(B, x, y, z)`` bool: cells holding voxels of ``dilate(mask, k x k x (k-3)) - mask``
    (``mask (B, X, Y, Z)`` bool, ``k (B,)`` long) and no pancreas voxel. (A cell without pancreas
    holds a ring voxel iff it holds a dilated voxel: the pooled dilation minus the pancreas cells.)"""
    size = torch.stack([k, k, (k - 3).clamp(min=1)], dim=1)
    return box_dilate(mask, size, stride=DOWNSAMPLE) & ~pool_any(mask)


def skeleton_cells(mask_low: torch.Tensor, rounds: int | None = None) -> torch.Tensor:
    """3D skeleton of ``mask_low (B, x, y, z)`` bool (``thin``), same shape."""
    return thin(mask_low, rounds)  # type: ignore[return-value]


def ring_skeleton_cells(ring_low: torch.Tensor, rounds: int | None = None) -> torch.Tensor:
    """2D skeleton of every axial slice of ``ring_low (B, x, y, z)`` bool (``thin`` of (x, y) images), same shape."""
    b, x, y, z = ring_low.shape
    slices = ring_low.permute(0, 3, 1, 2).reshape(b * z, 1, x, y)
    return thin(slices, rounds).reshape(b, z, x, y).permute(0, 2, 3, 1)  # type: ignore[union-attr]


def pick_per_slice(candidates: torch.Tensor, eligible: torch.Tensor,
                   scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One cell per axial slice: the candidate of highest score (uniform scores: a uniform pick).

    Args:
        candidates: ``(B, x, y, z)`` bool; eligible: ``(B, z)`` bool; scores: ``(B, x, y, z)`` in [0, 1).
    Returns:
        ``xy (B, z, 2)`` long and ``valid (B, z)`` bool (eligible and holding a candidate).
    """
    b, x, y, z = candidates.shape
    flat = torch.where(candidates, scores, -1.0).permute(0, 3, 1, 2).reshape(b, z, x * y)
    best = flat.argmax(dim=2)
    valid = eligible & candidates.flatten(1, 2).any(dim=1)
    return torch.stack([best // y, best % y], dim=2), valid


def sample_cells(label: torch.Tensor, *, ring_kernel: tuple[int, int], min_pos_voxels: int,
                 min_neg_voxels: int, generator: torch.Generator | None = None,
                 k: torch.Tensor | None = None, rounds: int | None = None) -> CellSamples:
    """Structure samples of a label batch ``(B, 1, X, Y, Z)`` on its device (X, Y, Z multiples of 8).

    ``k (B,)`` of the ring is drawn uniformly from ``ring_kernel`` (inclusive) per sample unless given;
    the draws come from ``generator`` (default: torch's global RNG of the label's device).
    ``rounds``: thinning rounds of the skeletons (``thin``'s default when None).
    """
    if label.dim() != 5 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, X, Y, Z), got shape {list(label.shape)}")
    mask = label[:, 0] > 0.5
    device, b = mask.device, mask.shape[0]
    if k is None:
        k = torch.randint(ring_kernel[0], ring_kernel[1] + 1, (b,), device=device, generator=generator)
    mask_low = pool_any(mask)
    ring_low = ring_cells(mask, k)
    z = mask_low.shape[3]
    slots = []
    for cells, candidates, min_voxels in ((mask_low, skeleton_cells(mask_low, rounds), min_pos_voxels),
                                          (ring_low, ring_skeleton_cells(ring_low, rounds), min_neg_voxels)):
        eligible = cells.sum(dim=(1, 2)) >= min_voxels
        scores = torch.rand(cells.shape, device=device, generator=generator)
        slots.append(pick_per_slice(candidates, eligible, scores))
    batch = torch.arange(b, device=device)[:, None].expand(b, z)
    depth = torch.arange(z, device=device)[None, :].expand(b, z)
    index = torch.cat([torch.stack([batch, xy[..., 0], xy[..., 1], depth], dim=2).reshape(-1, 4)
                       for xy, _ in slots])
    valid = torch.cat([v.reshape(-1) for _, v in slots])
    is_pancreas = torch.arange(2 * b * z, device=device) < b * z
    return CellSamples(index, is_pancreas, valid)
