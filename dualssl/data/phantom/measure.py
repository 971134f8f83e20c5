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
