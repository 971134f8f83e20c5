"""Measurements on a rendered or written case: tissue medians in organ cores."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dualssl.data.phantom.tissues import Tissue

MIN_CORE_VOXELS = 10


def erosion_for(blur_px: float) -> int:
    """In-plane erosion (pixels) that keeps a core clear of a reconstruction blur of ``blur_px``."""
    return 1 + int(np.ceil(1.5 * blur_px))


FAT = (Tissue.SUBCUT_FAT, Tissue.VISCERAL_FAT)
"""Subcutaneous and visceral fat, measured together (either can be thin)."""


def core_mask(organs: np.ndarray, pure: np.ndarray, tissue: Tissue | tuple[Tissue, ...], erode_px: int = 2,
              min_voxels: int = MIN_CORE_VOXELS) -> np.ndarray:
    """Voxels of ``tissue`` (one or a tuple) whose slab is pure, eroded in-plane by up to
    ``erode_px`` pixels (away from blur and partial volume) but never below ``min_voxels`` voxels
    when the organ has them. All arrays (X, Y, Z), slices along the last axis."""
    tissues = tissue if isinstance(tissue, tuple) else (tissue,)
    mask = np.isin(organs, np.asarray(tissues, np.uint8)) & pure
    for _ in range(erode_px):
        inner = ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool))
        if inner.sum() < min_voxels:
            break
        mask = inner
    return mask


def core_medians(image: np.ndarray, organs: np.ndarray, pure: np.ndarray,
                 tissues: dict[str, Tissue | tuple[Tissue, ...]], erode_px: int = 2) -> dict[str, float | None]:
    """Median stored value of each named tissue's core (None when under ``MIN_CORE_VOXELS`` voxels).

    ``image``, ``organs``, ``pure``: (X, Y, Z) arrays of one case in one orientation whose slice
    axis is the last (every phantom orientation is axial).
    """
    out: dict[str, float | None] = {}
    for name, t in tissues.items():
        core = core_mask(organs, pure, t, erode_px)
        out[name] = float(np.median(image[core])) if core.sum() >= MIN_CORE_VOXELS else None
    return out


FAT_BELOW_HU = -30.0
"""Voxels below this count as fat in :func:`peripancreatic_appearance` (fat is about -100 HU)."""


def peripancreatic_appearance(hu: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                              grid_mm: tuple[float, float, float] = (3.0, 3.0, 4.0),
                              ring_voxels: int = 3) -> dict[str, float]:
    """What a segmenter sees of the pancreas and its surroundings, at its training resolution: the
    figures that tell a phantom from a real scan where it matters.

    Args:
        hu: ``(X,Y,Z)`` CT numbers (HU).
        label: ``(X,Y,Z)`` pancreas mask (non-zero = pancreas).
        spacing: voxel size of both (mm).
        grid_mm: both are resampled (linear) to this voxel size first (the ``demo`` recipe's 3x3x4 mm).
        ring_voxels: the ring is the mask dilated this many times (6-connected) minus the mask.

    Returns:
        ``pancreas_hu_mean``, ``pancreas_hu_sd`` inside the mask; ``ring_hu_mean``,
        ``ring_fat_fraction`` (below :data:`FAT_BELOW_HU`) and ``ring_soft_fraction`` (from
        :data:`FAT_BELOW_HU` to 150 HU: organs, bowel, unenhanced vessels) in the ring.
    """
    hu = np.asarray(hu, np.float32)
    lab = np.asarray(label)
    if hu.shape != lab.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and label {lab.shape}: expected the same 3D (X,Y,Z) shape")
    zoom = [float(s) / float(g) for s, g in zip(spacing, grid_mm)]
    if any(abs(z - 1.0) > 1e-6 for z in zoom):
        hu = ndimage.zoom(hu, zoom, order=1)
        lab = ndimage.zoom((lab != 0).astype(np.float32), zoom, order=1) >= 0.5
    else:
        lab = lab != 0
    if not lab.any():
        raise ValueError("label: no pancreas voxel at the measuring resolution")
    ring = ndimage.binary_dilation(lab, iterations=ring_voxels) & ~lab
    inside, around = hu[lab], hu[ring]
    return {"pancreas_hu_mean": float(inside.mean()), "pancreas_hu_sd": float(inside.std()),
            "ring_hu_mean": float(around.mean()), "ring_fat_fraction": float((around < FAT_BELOW_HU).mean()),
            "ring_soft_fraction": float(((around >= FAT_BELOW_HU) & (around < 150.0)).mean())}
