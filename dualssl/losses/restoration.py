"""Local self-supervision: corrupt blobs of the uncertainty band, restore the clean image there.

``corrupt_region`` makes the network's input, ``restoration_loss`` scores the restoration head's
output on exactly the corrupted voxels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dualssl.losses.corruptions import corrupt_batch, select_voxels
from dualssl.losses.uncertainty import uncertainty_region


def corrupt_region(image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], *, ratio: float,
                   band_mm: float, probs: torch.Tensor | None = None,
                   entropy_threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a fraction ``ratio`` of the high-uncertainty region's voxels.

    Args:
        image: ``(B, C, X, Y, Z)`` in [0, 1].
        label: ``(B, 1, X, Y, Z)`` in {0, 1}.
        spacing: voxel size in mm ``(X, Y, Z)`` (band width).
        probs: optional ``(B, K, X, Y, Z)`` probabilities; high-entropy voxels widen the region.
    Returns:
        ``(corrupted image (B, C, X, Y, Z), corrupt_mask (B, 1, X, Y, Z) bool)``; the image equals
        ``image`` outside the mask.
    """
    if image.dim() != 5 or label.dim() != 5 or label.shape[1] != 1 or image.shape[0] != label.shape[0] \
            or image.shape[2:] != label.shape[2:]:
        raise ValueError(f"image (B, C, X, Y, Z) {list(image.shape)} and label (B, 1, X, Y, Z) "
                         f"{list(label.shape)} do not match")
    region = uncertainty_region(label, spacing, band_mm, probs=probs, entropy_threshold=entropy_threshold)
    mask = select_voxels(region, ratio)
    return corrupt_batch(image, mask), mask


def restoration_loss(restored: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor,
                     kind: str = "l1") -> torch.Tensor:
    """Mean L1 (or squared) error between ``restored`` and ``clean`` over the voxels of ``mask``.

    Args:
        restored, clean: ``(B, C, X, Y, Z)``.
        mask: ``(B, 1, X, Y, Z)`` bool.
    Returns:
        scalar float32; an exact zero with a zero-gradient path when the mask is empty.
    """
    if restored.shape != clean.shape:
        raise ValueError(f"restored {list(restored.shape)} and clean image {list(clean.shape)} differ in shape")
    if mask.shape[0] != clean.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != clean.shape[2:]:
        raise ValueError(f"corrupt_mask must be (B, 1, X, Y, Z) matching {list(clean.shape)}, got {list(mask.shape)}")
    if kind not in ("l1", "mse"):
        raise ValueError(f"loss.rec_loss: choose 'l1' or 'mse', got {kind!r}")
    m = mask.expand_as(clean)
    n = m.sum()
    if int(n) == 0:
        return restored.float().sum() * 0.0
    pred, target = restored.float()[m], clean.float()[m]
    err = F.l1_loss(pred, target, reduction="sum") if kind == "l1" else F.mse_loss(pred, target, reduction="sum")
    return err / n
