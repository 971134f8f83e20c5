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


def _detrend(tile: np.ndarray) -> np.ndarray:
    """``tile`` minus its least-squares quadratic surface (removes anatomy's slow gradients)."""
    n, m = tile.shape
    y, x = np.mgrid[0:n, 0:m].astype(np.float64)
    x, y = x / m - 0.5, y / n - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(basis, tile.reshape(-1).astype(np.float64), rcond=None)
    return tile - (basis @ coef).reshape(n, m)


def noise_power_spectrum(hu: np.ndarray, spacing: tuple[float, float, float], roi_mm: float = 24.0,
                         hu_window: tuple[float, float] = (20.0, 200.0), keep: float = 0.25,
                         slice_step: int = 4, bins: int = 12, min_tiles: int = 8) -> dict[str, object]:
    """In-plane noise power spectrum of a scan, from its most uniform soft-tissue squares; no label needed.

    Every ``slice_step``-th axial slice is cut into non-overlapping squares of ``roi_mm``. A square
    counts when all its values lie in ``hu_window`` (enhanced liver, spleen, muscle); each gets its
    quadratic trend removed, and the ``keep`` fraction with the smallest residual SD (the most uniform:
    no vessel or edge inside) are averaged: ``NPS(u, v) = dx dy / (N M) |DFT(residual)|^2``, so that
    its integral over frequency is the residual variance. The same estimator on a phantom case and
    on a real scan compares their noise level and texture (grain size: ``mean_freq``).

    Args:
        hu: ``(X, Y, Z)`` CT numbers, slices along the last axis.
        spacing: voxel size (mm) of ``hu``.

    Returns:
        ``freq_per_mm`` (bin centres, 0 to the in-plane Nyquist), ``nps`` (radial mean, HU^2 mm^2),
        ``noise_sd`` (HU, square root of the spectrum's integral), ``mean_freq_per_mm`` (the
        spectrum's centroid), ``peak_freq_per_mm`` and ``tiles`` (how many squares were averaged).
    """
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3:
        raise ValueError(f"hu {hu.shape}: expected a 3D (X,Y,Z) array")
    dx, dy = float(spacing[0]), float(spacing[1])
    n = int(round(roi_mm / max(dx, dy)))
    if n < 6:
        raise ValueError(f"roi_mm={roi_mm}: only {n} pixels at {dx:.2f} x {dy:.2f} mm; take roi_mm >= {6 * max(dx, dy):.0f}")
    tiles = []
    for z in range(0, hu.shape[2], max(1, slice_step)):
        sl = hu[:, :, z]
        for i in range(0, sl.shape[0] - n + 1, n):
            for j in range(0, sl.shape[1] - n + 1, n):
                tile = sl[i:i + n, j:j + n]
                if tile.min() >= hu_window[0] and tile.max() <= hu_window[1]:
                    tiles.append(_detrend(tile))
    if len(tiles) < min_tiles / keep:
        raise ValueError(f"only {len(tiles)} squares of {roi_mm} mm lie wholly in {hu_window} HU "
                         f"(need {int(np.ceil(min_tiles / keep))}): take a smaller roi_mm or a wider hu_window")
    tiles.sort(key=lambda t: float(t.std()))
    chosen = np.stack(tiles[:max(min_tiles, int(round(keep * len(tiles))))])
    power = (np.abs(np.fft.fft2(chosen, axes=(1, 2))) ** 2).mean(axis=0) * dx * dy / (n * n)
    fu, fv = np.fft.fftfreq(n, dx), np.fft.fftfreq(n, dy)
    radius = np.hypot(fu[:, None], fv[None, :])
    nyquist = 0.5 / max(dx, dy)
    edges = np.linspace(0.0, nyquist, bins + 1)
    which = np.digitize(radius, edges) - 1
    nps = np.array([power[which == b].mean() if (which == b).any() else np.nan for b in range(bins)])
    df = 1.0 / (n * dx) * 1.0 / (n * dy)
    total = float(power.sum() * df)
    return {"freq_per_mm": [float(f) for f in 0.5 * (edges[:-1] + edges[1:])],
            "nps": [float(v) for v in nps], "noise_sd": float(np.sqrt(total)),
            "mean_freq_per_mm": float((power * radius).sum() / power.sum()),
            "peak_freq_per_mm": float(0.5 * (edges[int(np.nanargmax(nps))] + edges[int(np.nanargmax(nps)) + 1])),
            "tiles": int(len(chosen))}
