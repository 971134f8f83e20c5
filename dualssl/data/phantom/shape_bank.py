"""Real pancreas shapes for the phantom: a bank of label masks, deformed and placed in the anatomy.

``ShapeBank(folder)`` lists the ``.nii``/``.nii.gz`` masks of a folder (e.g. the 73 MSD Task07 masks in
``../shared/data/labels/msd_task07_pancreas``); nothing is copied, each mask is read when a case
draws it. :func:`place_bank_pancreas` takes the procedural pancreas of one abdomen and returns a
pancreas whose painted shape is a bank mask instead:

* the mask is read in RAS (``nib.as_closest_canonical``), cropped to its bounding box and resampled to
  ``BANK_SPACING_MM`` isotropic voxels (linear interpolation of the mask, threshold 0.5);
* it is deformed by a small random affine (rotation within +-8/5/5 degrees about z/y/x, axis
  scales within +-6 % rescaled to keep the volume) and a smooth elastic displacement (2 mm, 35 mm
  wavelength), so one mask gives many glands;
* its centroid is put at the procedural pancreas' centroid, in the body frame (the bank is RAS and
  so is the body frame), so it sits where the procedural gland sits: head in the duodenal C-loop,
  neck in front of the confluence, body over the aorta.

The returned :class:`~dualssl.data.phantom.anatomy.Pancreas` carries a centreline tube fitted to the
placed mask (head to tail, radius from each section's area), so the duodenum, the splenic vein and
the bowel that the anatomy builds around ``pancreas.tube`` follow the real shape.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from dualssl.data.phantom.fields import SmoothField
from dualssl.data.phantom.shapes import Bounds, Tube, rotation

BANK_SPACING_MM = 1.0
"""Isotropic voxel of the resampled bank masks (mm)."""
MAX_BANK_ML = 150.0
"""Masks above this volume (tumour-laden glands of MSD Task07) are not drawn."""
ELASTIC_MM = 2.0
ELASTIC_WAVELENGTH_MM = 35.0


class ShapeBank:
    """The mask files of ``folder`` (sorted by name); ``load(i)`` reads and resamples one (cached)."""

    def __init__(self, folder: str | Path, max_ml: float = MAX_BANK_ML):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"shape bank {self.folder}: not a folder; give a folder of pancreas mask "
                             "NIfTI files (e.g. ../shared/data/labels/msd_task07_pancreas)")
        self.files = sorted(p for p in self.folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not self.files:
            raise ValueError(f"shape bank {self.folder}: no .nii/.nii.gz masks in it")
        self.max_ml = float(max_ml)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ShapeBank({str(self.folder)!r}, {len(self)} masks)"

    def load(self, index: int) -> "BankMask":
        return _load_mask(str(self.files[index]))

    def draw(self, rng: np.random.Generator) -> "BankMask":
        """A random mask of at most ``max_ml`` (a few tries, then the smallest tried)."""
        tried = []
        for _ in range(20):
            mask = self.load(int(rng.integers(len(self))))
            if mask.volume_ml <= self.max_ml:
                return mask
            tried.append(mask)
        return min(tried, key=lambda m: m.volume_ml)


@dataclass(frozen=True)
class BankMask:
    """A bank mask resampled to ``spacing`` mm, RAS axes, cropped with a 2-voxel margin."""

    name: str
    mask: np.ndarray
    """float32 (X, Y, Z) occupancy in [0, 1] (linearly interpolated; inside where >= 0.5)."""
    spacing: float
    centroid: np.ndarray
    """Centroid (3,) in mm in the array's frame (voxel i at i * spacing)."""
    volume_ml: float
    """Volume of the original mask (ml)."""


@lru_cache(maxsize=16)
def _load_mask(path: str) -> BankMask:
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.dataobj) > 0
    if not data.any():
        raise ValueError(f"shape bank mask {path}: empty (no voxel > 0)")
    zooms = np.array(img.header.get_zooms()[:3], float)
    volume = float(data.sum() * zooms.prod() / 1000.0)
    lo, hi = np.argwhere(data).min(0), np.argwhere(data).max(0) + 1
    crop = data[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    crop = np.pad(crop, 1)
    zoom = zooms / BANK_SPACING_MM
    fine = ndimage.zoom(crop, zoom, order=1, mode="grid-constant", cval=0.0, grid_mode=True)
    fine = np.pad(fine, 2).astype(np.float32)
    inside = fine >= 0.5
    centroid = np.argwhere(inside).mean(0) * BANK_SPACING_MM
    name = Path(path).name.split(".nii")[0]
    return BankMask(name, fine, BANK_SPACING_MM, centroid, volume)


@dataclass
class BankShape:
    """A bank mask placed in the body frame: ``p`` is inside when the mask, sampled at
    ``inv @ (p - center) + elastic(p) + mask.centroid``, is >= 0.5."""

    mask: BankMask
    center: np.ndarray
    """Body-frame position (mm) of the mask's centroid."""
    forward: np.ndarray
    """3x3 linear map, mask frame -> body frame (rotation x volume-preserving scale)."""
    elastic: tuple[SmoothField, SmoothField, SmoothField]

    def __post_init__(self) -> None:
        self.inv = np.linalg.inv(self.forward)

    def bounds(self) -> Bounds:
        ext = (np.array(self.mask.mask.shape) - 1) * self.mask.spacing - self.mask.centroid
        corners = np.array(np.meshgrid(*zip(-self.mask.centroid, ext))).reshape(3, -1).T
        world = corners @ self.forward.T + self.center
        slack = 3.5 * ELASTIC_MM
        return world.min(0) - slack, world.max(0) + slack

    def occupancy(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = [np.asarray(x, np.float32) - np.float32(self.center[0]),
             np.asarray(y, np.float32) - np.float32(self.center[1]),
             np.asarray(z, np.float32) - np.float32(self.center[2])]
        q = []
        for j in range(3):
            m = self.inv[j].astype(np.float32)
            v = d[0] * m[0] + d[1] * m[1] + d[2] * m[2]
            v = v + self.elastic[j](x, y, z) + np.float32(self.mask.centroid[j])
            q.append(np.ravel(v) / np.float32(self.mask.spacing))
        occ = ndimage.map_coordinates(self.mask.mask, q, order=1, mode="constant", cval=0.0)
        return occ.reshape(np.broadcast_shapes(*(np.shape(a) for a in (x, y, z))))

    def inside(self, x, y, z):
        return self.occupancy(x, y, z) >= 0.5

    def points(self) -> np.ndarray:
        """Body-frame positions (N, 3) of the mask's inside voxels (no elastic term)."""
        idx = np.argwhere(self.mask.mask >= 0.5) * self.mask.spacing - self.mask.centroid
        return idx @ self.forward.T + self.center


def bank_rng(seed: int) -> np.random.Generator:
    """The bank's own random stream of a case (the procedural anatomy's draws stay as they are)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"shape-bank")]))


def random_placement(rng: np.random.Generator, mask: BankMask, center: np.ndarray) -> BankShape:
    """Small random affine (volume kept) and elastic deformation of ``mask``, centred at ``center``."""
    rot = rotation(rng.uniform(-8, 8), rng.uniform(-5, 5), rng.uniform(-5, 5))
    scales = rng.uniform(0.94, 1.06, 3)
    scales /= scales.prod() ** (1 / 3)
    elastic = tuple(SmoothField.random(rng, ELASTIC_WAVELENGTH_MM, gain=ELASTIC_MM) for _ in range(3))
    return BankShape(mask, np.asarray(center, float), rot @ np.diag(scales), elastic)


def centreline(points: np.ndarray, n_bins: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Knots (K, 3) and radii (K,) of a head-to-tail centreline through ``points`` (N, 3): sections
    along the main axis (oriented from the patient's right, the head), radius sqrt(area / pi)."""
    c = points.mean(0)
    _, _, vt = np.linalg.svd(points - c, full_matrices=False)
    axis = vt[0] if vt[0][0] > 0 else -vt[0]          # towards the patient's right (+x): the head
    t = (points - c) @ axis
    edges = np.linspace(t.min(), t.max(), n_bins + 1)
    width = edges[1] - edges[0]
    knots, radii = [], []
    for i in range(n_bins - 1, -1, -1):               # head (+x end) first
        sel = (t >= edges[i]) & (t <= edges[i + 1])
        if sel.sum() < 5:
            continue
        knots.append(points[sel].mean(0))
        radii.append(np.sqrt(sel.sum() * BANK_SPACING_MM ** 3 / width / np.pi))
    return np.array(knots), np.array(radii)


def place_bank_pancreas(bank: ShapeBank, rng: np.random.Generator, pancreas,
                        clear_of: tuple[tuple[float, float, float], ...] = ()):
    """A copy of ``pancreas`` (:class:`~dualssl.data.phantom.anatomy.Pancreas`) whose ``shape`` is a
    random bank mask placed at the procedural gland's centroid and whose ``tube`` is that mask's
    centreline (for the organs built around it).

    ``clear_of``: vertical vessels ``(x, y, radius)`` (aorta, IVC) the gland lies in front of; the mask
    moves forward (up to 24 mm) until under 0.5 % of it overlaps them."""
    tube = pancreas.tube
    weights = tube.radii ** 2
    center = (tube.points * weights[:, None]).sum(0) / weights.sum()
    shape = random_placement(rng, bank.draw(rng), center)
    pts = shape.points()
    for dy in np.arange(0.0, 25.0, 2.0):
        hit = np.zeros(len(pts), bool)
        for x, y, r in clear_of:
            hit |= (pts[:, 0] - x) ** 2 + (pts[:, 1] + dy - y) ** 2 < (r + 1.5) ** 2
        if hit.mean() < 0.005:
            break
    shape.center = shape.center + np.array([0.0, dy, 0.0])
    knots, radii = centreline(shape.points())
    new_tube = Tube.through(knots, radii, step_mm=0.6)
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(new_tube.points, axis=0), axis=1))])
    s = arc / arc[-1]
    head_i = int(np.argmin(np.abs(s - 0.18)))
    return replace(pancreas, tube=new_tube, region_s=s, length_mm=float(arc[-1] - arc[head_i]), shape=shape)
