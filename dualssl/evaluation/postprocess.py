"""Post-processing of predicted masks: keep the largest connected component and any over half its size.

MONAI's ``KeepLargestConnectedComponent`` keeps a fixed number of components (``num_components``), not
"every component at least a fraction of the largest", so this uses ``scipy.ndimage.label``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def keep_large_components(mask: np.ndarray | torch.Tensor, min_fraction: float = 0.5,
                          connectivity: int = 3) -> np.ndarray | torch.Tensor:
    """Keep the largest foreground component and every other one larger than ``min_fraction`` of it.

    Args:
        mask: label map ``(X,Y,Z)`` or ``(1,X,Y,Z)``; every non-zero voxel is foreground, and the
            labels of kept voxels are preserved (removed voxels become 0).
        min_fraction: a component other than the largest is kept when its size is strictly greater
            than ``min_fraction`` times the largest one's.
        connectivity: 1 = faces (6-neighbourhood), 2 = faces+edges (18), 3 = full (26).

    Returns:
        The same type, shape and dtype as ``mask``.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in [0, 1], got {min_fraction}")
    is_tensor = isinstance(mask, torch.Tensor)
    arr = mask.detach().cpu().numpy() if is_tensor else np.asarray(mask)
    fg = arr != 0
    if fg.ndim not in (3, 4):
        raise ValueError(f"mask: expected (X,Y,Z) or (C,X,Y,Z), got shape {tuple(fg.shape)}")
    structure = ndimage.generate_binary_structure(3, connectivity)
    if fg.ndim == 4:  # channel-first: components never connect across the channel axis
        off = np.zeros_like(structure)
        structure = np.stack([off, structure, off])
    components, n = ndimage.label(fg, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    keep_ids = np.flatnonzero(sizes > min_fraction * sizes.max()) + 1
    keep_ids = np.union1d(keep_ids, [int(np.argmax(sizes)) + 1])
    out = np.where(np.isin(components, keep_ids), arr, np.zeros((), dtype=arr.dtype)).astype(arr.dtype)
    return torch.from_numpy(out).to(mask.device) if is_tensor else out
