"""The high-uncertainty region: a band around the pancreas boundary, optionally widened by prediction entropy.

Torch ops only (separable box morphology on bool tensors), so it runs on the batch's device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def band_radius(spacing: Sequence[float], band_mm: float) -> tuple[int, int, int]:
    """Half-width in voxels per axis ``(rx, ry, rz)`` of a band ``band_mm`` mm wide (rounded, >= 0)."""
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"data.spacing: three positive voxel sizes in mm, got {tuple(spacing)}")
    if band_mm <= 0:
        raise ValueError(f"loss.band_mm: must be > 0 mm, got {band_mm}")
    return tuple(int(math.floor(band_mm / s + 0.5)) for s in spacing)  # type: ignore[return-value]


def _box_filter(mask: torch.Tensor, radius: Sequence[int], dilate: bool) -> torch.Tensor:
    """Separable binary dilation (OR) or erosion (AND) of a bool ``(B, 1, X, Y, Z)`` by a ``(2r+1)`` box.

    Shifted slices combine only voxels inside the patch, so the outside counts as unknown: the
    patch edge neither grows nor erodes the mask. (On the CPU this is ~20x faster than max_pool3d.)
    """
    combine = torch.logical_or if dilate else torch.logical_and
    out = mask
    for axis, r in enumerate(radius):
        dim, n = axis + 2, out.shape[axis + 2]
        src, out = out, out.clone()
        for s in range(1, min(int(r), n - 1) + 1):
            head, tail = out.narrow(dim, 0, n - s), out.narrow(dim, s, n - s)
            head.copy_(combine(head, src.narrow(dim, s, n - s)))
            tail.copy_(combine(tail, src.narrow(dim, 0, n - s)))
    return out


def dilate(mask: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Binary dilation of a bool ``(B, 1, X, Y, Z)`` by a box of half-widths ``radius`` voxels."""
    return _box_filter(mask, radius, dilate=True)


def erode(mask: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Binary erosion of a bool ``(B, 1, X, Y, Z)`` by the same box (the patch edge does not erode)."""
    return _box_filter(mask, radius, dilate=False)


def boundary_band(label: torch.Tensor, spacing: Sequence[float], band_mm: float) -> torch.Tensor:
    """``dilate(label) - erode(label)``: voxels within about ``band_mm`` mm of the label's boundary.

    Args:
        label: ``(B, 1, X, Y, Z)`` in {0, 1} (any dtype).
        spacing: voxel size in mm ``(X, Y, Z)``; the structuring element is an anisotropic box with
            half-widths ``round(band_mm / spacing)`` voxels.
    Returns:
        ``(B, 1, X, Y, Z)`` bool.
    """
    if label.dim() != 5 or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, X, Y, Z), got shape {list(label.shape)}")
    radius = band_radius(spacing, band_mm)
    mask = label > 0.5
    return dilate(mask, radius) & ~erode(mask, radius)


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over classes divided by log(K): ``(B, K, X, Y, Z)`` probabilities -> ``(B, 1, X, Y, Z)`` in [0, 1]."""
    p = probs.float().clamp_min(1e-8)
    return -(p * p.log()).sum(dim=1, keepdim=True) / math.log(probs.shape[1])


def uncertainty_region(label: torch.Tensor, spacing: Sequence[float], band_mm: float,
                       probs: torch.Tensor | None = None, entropy_threshold: float = 0.5) -> torch.Tensor:
    """Boundary band, united with voxels whose prediction entropy exceeds ``entropy_threshold`` when ``probs`` is given.

    Args:
        label: ``(B, 1, X, Y, Z)`` in {0, 1}.
        probs: optional ``(B, K, X, Y, Z)`` softmax probabilities of a prediction of the same patch.
    Returns:
        ``(B, 1, X, Y, Z)`` bool.
    """
    band = boundary_band(label, spacing, band_mm)
    if probs is None:
        return band
    if probs.dim() != 5 or probs.shape[0] != label.shape[0] or probs.shape[2:] != label.shape[2:]:
        raise ValueError(f"probs must be (B, K, X, Y, Z) matching label {list(label.shape)}, "
                         f"got {list(probs.shape)}")
    return band | (normalised_entropy(probs.detach()) > entropy_threshold)
