"""Painters: the steps that write tissue classes into the organ map, in anatomical order.

Each painter has ``apply(labels, grid)``; later painters overwrite earlier ones (where allowed by
``only``), so the order of the list is the order of precedence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from dualssl.data.phantom.grid import Grid, paint
from dualssl.data.phantom.shapes import Shape, Tube
from dualssl.data.phantom.tissues import Tissue


@dataclass
class Paint:
    """Fill ``shape`` with ``value`` (only over the classes in ``only``, if given)."""

    shape: Shape
    value: Tissue
    only: tuple[int, ...] | None = None

    def apply(self, labels: np.ndarray, grid: Grid) -> None:
        paint(labels, grid, self.shape, int(self.value), self.only)


def _voxels(labels: np.ndarray, grid: Grid, shape: Shape, only: tuple[int, ...] | None):
    """(box, mask of the box's voxels to consider, body coords of those voxels) or None."""
    box = grid.box(shape)
    if box is None:
        return None
    x, y, z = grid.body_coords(box)
    x, y, z = np.broadcast_arrays(x, y, z)
    mask = np.isin(labels[box], np.asarray(only, np.uint8)) if only is not None else np.ones(x.shape, bool)
    if hasattr(shape, "candidates"):
        mask &= shape.candidates(x, y, z)
    return box, mask, x[mask], y[mask], z[mask]


@dataclass
class Hollow:
    """A hollow viscus along ``tube``: a wall of ``wall_mm``, ``content`` inside, and gas floating
    to the non-dependent side (``up``, body frame) over the fraction ``gas`` of the lumen height
    (``gas`` (M,) per centreline sample, 0 = no gas, 1 = full of gas)."""

    tube: Tube
    wall_mm: float
    wall: Tissue
    content: Tissue
    gas: np.ndarray
    up: np.ndarray
    only: tuple[int, ...] | None = None

    def apply(self, labels: np.ndarray, grid: Grid) -> None:
        found = _voxels(labels, grid, self.tube, self.only)
        if found is None:
            return
        box, mask, x, y, z = found
        d, i = self.tube.nearest(x, y, z)
        r = self.tube.radii[i] * (1.0 + self.tube.noise(x, y, z) if self.tube.noise else 1.0)
        c = self.tube.points[i]
        height = ((x - c[:, 0]) * self.up[0] + (y - c[:, 1]) * self.up[1] + (z - c[:, 2]) * self.up[2]) / r
        out = np.full(x.shape, 255, np.uint8)
        out[d < r] = self.wall
        lumen = d < r - self.wall_mm
        out[lumen] = self.content
        out[lumen & (height > 1.0 - 2.0 * self.gas[i])] = Tissue.GAS
        region = labels[box]
        vals = region[mask]
        keep = out != 255
        vals[keep] = out[keep]
        region[mask] = vals


@dataclass
class BowelLoops:
    """Small-bowel loops packed in ``zone``: one elongated cell per seed (``seeds`` (N, 3),
    ``radii`` (N,), long axis ``axes`` (N, 3) stretched by 1/sqrt(1 - ``stretch``)). A wall where a
    cell meets its neighbour or the mesenteric fat; inside, ``content`` (N,) tissue (collapsed
    loops are wall throughout) with gas (fraction ``gas`` (N,) of the lumen height) on the
    non-dependent side."""

    zone: Shape
    seeds: np.ndarray
    radii: np.ndarray
    axes: np.ndarray
    stretch: np.ndarray
    content: np.ndarray
    gas: np.ndarray
    up: np.ndarray
    wall_mm: float = 2.0
    only: tuple[int, ...] = (Tissue.VISCERAL_FAT,)

    def apply(self, labels: np.ndarray, grid: Grid) -> None:
        if len(self.seeds) < 4:
            return
        found = _voxels(labels, grid, self.zone, self.only)
        if found is None:
            return
        box, mask, x, y, z = found
        zone = self.zone.inside(x, y, z)
        p = np.stack([x[zone], y[zone], z[zone]], 1).astype(np.float32)
        _, idx = cKDTree(self.seeds).query(p, k=4)
        v = p[:, None, :] - self.seeds[idx].astype(np.float32)              # (N, 4, 3)
        along = np.einsum("nkc,nkc->nk", v, self.axes[idx].astype(np.float32))
        d = np.sqrt(np.maximum((v * v).sum(2) - self.stretch[idx] * along ** 2, 0)) - self.radii[idx]
        order = np.argsort(d, axis=1)
        d1 = np.take_along_axis(d, order[:, :1], 1)[:, 0]
        d2 = np.take_along_axis(d, order[:, 1:2], 1)[:, 0]
        cell = np.take_along_axis(idx, order[:, :1], 1)[:, 0]
        r = self.radii[cell]
        height = ((p - self.seeds[cell]) @ self.up) / r
        out = np.full(len(p), 255, np.uint8)
        out[d1 < 0] = Tissue.BOWEL_WALL
        lumen = (d1 < -self.wall_mm) & (d2 - d1 > 2 * self.wall_mm)
        out[lumen] = self.content[cell][lumen]
        out[lumen & (height > 1.0 - 2.0 * self.gas[cell])] = Tissue.GAS
        region = labels[box]
        vals = region[mask]
        sub = vals[zone]
        keep = out != 255
        sub[keep] = out[keep]
        vals[zone] = sub
        region[mask] = vals
