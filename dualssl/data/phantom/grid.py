"""The voxel grid in the scanner (world) frame and the patient's pose on it.

World and body frames are both RAS in mm. The patient lies at ``p_world = rot @ p_body + shift``;
the grid is axis-aligned in the world, voxel ``(i, j, k)`` sits at ``origin + (i, j, k) * spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dualssl.data.phantom.shapes import Shape


@dataclass(frozen=True)
class Grid:
    """``shape`` (X, Y, Z) voxels of ``spacing`` mm, voxel 0 centred at ``origin`` (world mm)."""

    origin: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]
    rot: np.ndarray
    shift: np.ndarray

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of the voxel centres along X, Y and Z."""
        return tuple(self.origin[a] + self.spacing[a] * np.arange(self.shape[a]) for a in range(3))

    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world (RAS mm) matrix."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, shape: Shape) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels inside the world box of ``shape`` (None when it misses)."""
        lo, hi = shape.bounds()
        lo, hi = np.maximum(lo, -1e4), np.minimum(hi, 1e4)
        corners = np.array([[c[0], c[1], c[2]] for c in np.array(np.meshgrid(*zip(lo, hi))).reshape(3, -1).T])
        world = corners @ self.rot.T + self.shift
        wlo, whi = world.min(0), world.max(0)
        out = []
        for a in range(3):
            i0 = int(np.floor((wlo[a] - self.origin[a]) / self.spacing[a]))
            i1 = int(np.ceil((whi[a] - self.origin[a]) / self.spacing[a])) + 1
            i0, i1 = max(i0, 0), min(i1, self.shape[a])
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def body_coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Body-frame coordinates (three float32 arrays of the box's shape) of the voxels in ``box``."""
        xs, ys, zs = (ax[s].astype(np.float32) for ax, s in zip(self.axes(), box))
        d = [xs[:, None, None] - np.float32(self.shift[0]), ys[None, :, None] - np.float32(self.shift[1]),
             zs[None, None, :] - np.float32(self.shift[2])]
        r = self.rot.astype(np.float32)
        # p_body = rot^T (p_world - shift)
        return tuple(d[0] * r[0, j] + d[1] * r[1, j] + d[2] * r[2, j] for j in range(3))


def paint(labels: np.ndarray, grid: Grid, shape: Shape, value: int,
          only: tuple[int, ...] | None = None) -> int:
    """Set ``labels`` to ``value`` inside ``shape`` (where the label is in ``only``, if given).

    ``labels`` (X, Y, Z) uint8 on ``grid``; returns the number of voxels painted.
    """
    box = grid.box(shape)
    if box is None:
        return 0
    x, y, z = grid.body_coords(box)
    x, y, z = np.broadcast_arrays(x, y, z)
    inside = shape.inside(x, y, z)
    region = labels[box]
    if only is not None:
        inside &= np.isin(region, np.asarray(only, np.uint8))
    region[inside] = value
    return int(inside.sum())
