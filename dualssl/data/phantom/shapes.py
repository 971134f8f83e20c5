"""Implicit solids in the body frame (mm, RAS: +x patient's right, +y anterior, +z superior).

Every shape answers two questions: its axis-aligned bounding box (so that it is only evaluated on
the voxels near it) and, for coordinate arrays of one shape, which points lie inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator
from scipy.spatial import cKDTree

from dualssl.data.phantom.fields import SmoothField

Bounds = tuple[np.ndarray, np.ndarray]
_BIG = 1e4


class Shape(Protocol):
    def bounds(self) -> Bounds:
        """(lo, hi) corners (3,) of the box that holds the solid, mm."""

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (x, y, z arrays of one shape, mm) inside the solid."""


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: ``roll`` about x, then ``pitch`` about y, then ``yaw`` about z (degrees)."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass
class Ellipsoid:
    """Ellipsoid with semi-axes ``radii`` along the columns of ``rot``; ``noise`` bumps the surface
    by a relative amount (``|q|^2 < 1 + noise(p)``)."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    noise: SmoothField | None = None

    def bounds(self) -> Bounds:
        slack = 1.0 + (3.5 * self.noise.gain if self.noise else 0.0)
        half = np.sqrt(((self.rot * np.asarray(self.radii)[None, :]) ** 2).sum(1)) * slack
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """|q|^2 - 1 - noise: negative inside."""
        d = [x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2])]
        out = np.zeros(np.broadcast_shapes(*(np.shape(v) for v in d)), np.float32)
        for j in range(3):
            q = (d[0] * np.float32(self.rot[0, j]) + d[1] * np.float32(self.rot[1, j])
                 + d[2] * np.float32(self.rot[2, j])) / np.float32(self.radii[j])
            out += q * q
        out -= 1.0
        if self.noise is not None:
            out -= self.noise(x, y, z)
        return out

    def inside(self, x, y, z):
        return self.level(x, y, z) < 0


@dataclass
class SoftUnion:
    """Smooth union of ellipsoids: ``min`` of their levels, rounded by ``k`` (organ with lobes)."""

    parts: list[Ellipsoid]
    k: float = 0.3
    noise: SmoothField | None = None

    def bounds(self) -> Bounds:
        los, his = zip(*(p.bounds() for p in self.parts))
        pad = 1.0 + self.k
        lo, hi = np.min(los, 0), np.max(his, 0)
        c = (lo + hi) / 2
        return c + (lo - c) * pad, c + (hi - c) * pad

    def inside(self, x, y, z):
        levels = [p.level(x, y, z) for p in self.parts]
        out = levels[0]
        for lv in levels[1:]:
            h = np.clip(0.5 + 0.5 * (lv - out) / self.k, 0, 1)
            out = lv * (1 - h) + out * h - self.k * h * (1 - h)
        if self.noise is not None:
            out = out - self.noise(x, y, z)
        return out < 0


@dataclass
class Tube:
    """Swept tube along a centreline: points within ``radius(t) * (1 + noise)`` of the curve.

    ``points`` (M, 3) densely sampled centreline (spacing well under the radius), ``radii`` (M,);
    ``metric`` scales the axes before measuring distance (``(1, 1.4, 1)`` flattens the tube in y).
    """

    points: np.ndarray
    radii: np.ndarray
    noise: SmoothField | None = None
    metric: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self._scale = np.asarray(self.metric, float)
        self._tree = cKDTree(self.points * self._scale)

    @classmethod
    def through(cls, knots: np.ndarray, radii: np.ndarray | float, step_mm: float = 0.7,
                **kw) -> "Tube":
        """A cubic spline through ``knots`` (N, 3), radius interpolated (monotone) between the knots'
        ``radii`` (N,) or constant."""
        knots = np.asarray(knots, float)
        seg = np.linalg.norm(np.diff(knots, axis=0), axis=1)
        t = np.concatenate([[0], np.cumsum(seg)])
        n = max(2, int(np.ceil(t[-1] / step_mm)) + 1)
        ts = np.linspace(0, t[-1], n)
        pts = CubicSpline(t, knots, bc_type="natural")(ts) if len(knots) > 2 else \
            knots[0] + (knots[1] - knots[0]) * (ts / t[-1])[:, None]
        r = np.broadcast_to(np.asarray(radii, float), (len(knots),))
        rs = PchipInterpolator(t, r)(ts) if len(knots) > 1 else np.full(n, r[0])
        return cls(pts, rs, **kw)

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())

    def bounds(self) -> Bounds:
        slack = (1.0 + 3.5 * (self.noise.gain if self.noise else 0.0)) * self.radii.max() / self._scale.min()
        return self.points.min(0) - slack, self.points.max(0) + slack

    def nearest(self, x, y, z) -> tuple[np.ndarray, np.ndarray]:
        """(distance in the metric, index of the nearest centreline sample) for each point."""
        pts = np.stack([np.ravel(x), np.ravel(y), np.ravel(z)], 1) * self._scale
        rmax = self.radii.max() * (1.0 + 3.5 * (self.noise.gain if self.noise else 0.0))
        d, i = self._tree.query(pts, distance_upper_bound=rmax)
        i = np.minimum(i, len(self.points) - 1)
        return d.reshape(np.shape(x)), i.reshape(np.shape(x))

    def candidates(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, block: int = 4) -> np.ndarray:
        """Mask of the points of a 3D coordinate box that may lie in the tube: the tree is asked
        about one point per ``block``^3 voxels, so long tubes in big boxes stay cheap."""
        if x.ndim != 3 or min(x.shape) < 2 * block:
            return np.ones(x.shape, bool)
        idx = np.ix_(*(np.minimum(np.arange(0, n, block) + block // 2, n - 1) for n in x.shape))
        c = [a[idx] for a in (x, y, z)]
        steps = [np.array([a[tuple(int(i == k) for i in range(3))] - a[0, 0, 0] for a in (x, y, z)])
                 for k in range(3)]
        half_diag = 0.5 * block * sum(np.linalg.norm(s * self._scale) for s in steps)
        reach = self.radii.max() * (1.0 + 3.5 * (self.noise.gain if self.noise else 0.0)) + half_diag
        pts = np.stack([a.ravel() for a in c], 1) * self._scale
        d, _ = self._tree.query(pts, distance_upper_bound=reach)
        near = (d < reach).reshape(c[0].shape)
        for axis in range(3):
            near = np.repeat(near, block, axis=axis)
        return near[: x.shape[0], : x.shape[1], : x.shape[2]]

    def inside(self, x, y, z):
        out = self.candidates(x, y, z)
        xs, ys, zs = x[out], y[out], z[out]
        d, i = self.nearest(xs, ys, zs)
        r = self.radii[i]
        if self.noise is not None:
            r = r * (1.0 + self.noise(xs, ys, zs))
        out[out] = d < r
        return out


@dataclass
class Section:
    """Prism of a super-elliptic cross-section (the trunk): ``|dx/a|^n + |dy/b|^n < 1`` with
    ``b = b_ant`` in front of ``center_y`` and ``b_post`` behind, between ``z0`` and ``z1``;
    ``taper`` grows the section by that fraction per 100 mm downward."""

    a: float
    b_ant: float
    b_post: float
    center_y: float = 0.0
    n: float = 2.4
    z0: float = -_BIG
    z1: float = _BIG
    taper: float = 0.0
    noise: SmoothField | None = None

    def bounds(self) -> Bounds:
        g = 1.0 + abs(self.taper) * 3 + (0.1 if self.noise else 0.0)
        return (np.array([-self.a * g, self.center_y - self.b_post * g, self.z0]),
                np.array([self.a * g, self.center_y + self.b_ant * g, self.z1]))

    def level(self, x, y, z) -> np.ndarray:
        grow = np.float32(1.0) - np.float32(self.taper / 100.0) * z
        dy = y - np.float32(self.center_y)
        b = np.where(dy > 0, np.float32(self.b_ant), np.float32(self.b_post)) * grow
        out = np.abs(x / (np.float32(self.a) * grow)) ** np.float32(self.n) + np.abs(dy / b) ** np.float32(self.n) - 1
        if self.noise is not None:
            out = out - self.noise(x, y, z)
        return out

    def inside(self, x, y, z):
        return (self.level(x, y, z) < 0) & (z >= self.z0) & (z <= self.z1)


@dataclass
class Where:
    """A solid given by a function of the coordinates and an explicit box."""

    lo: np.ndarray
    hi: np.ndarray
    fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def bounds(self) -> Bounds:
        return np.asarray(self.lo, float), np.asarray(self.hi, float)

    def inside(self, x, y, z):
        return self.fn(x, y, z)


@dataclass
class Intersect:
    parts: list

    def bounds(self) -> Bounds:
        los, his = zip(*(p.bounds() for p in self.parts))
        return np.max(los, 0), np.min(his, 0)

    def inside(self, x, y, z):
        out = self.parts[0].inside(x, y, z)
        for p in self.parts[1:]:
            out &= p.inside(x, y, z)
        return out


@dataclass
class Subtract:
    base: object
    cut: object

    def bounds(self) -> Bounds:
        return self.base.bounds()

    def inside(self, x, y, z):
        return self.base.inside(x, y, z) & ~self.cut.inside(x, y, z)


@dataclass
class Union:
    parts: list

    def bounds(self) -> Bounds:
        los, his = zip(*(p.bounds() for p in self.parts))
        return np.min(los, 0), np.max(his, 0)

    def inside(self, x, y, z):
        out = self.parts[0].inside(x, y, z)
        for p in self.parts[1:]:
            out |= p.inside(x, y, z)
        return out


def half_space(normal: np.ndarray, offset: float) -> Where:
    """Points with ``normal . p > offset`` (unbounded)."""
    nx, ny, nz = (np.float32(v) for v in normal)
    return Where(np.full(3, -_BIG), np.full(3, _BIG), lambda x, y, z: nx * x + ny * y + nz * z > offset)
