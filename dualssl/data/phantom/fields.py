"""Smooth random fields in mm, evaluated anywhere: shape noise, textures and CT noise textures.

A :class:`SmoothField` is a sum of random plane waves (random Fourier features), so it is defined
in world millimetres independently of any voxel grid: the same seed gives the same lobulation of a
pancreas at every ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SmoothField:
    """``f(p) = sum_k amp_k cos(k_k . p + phase_k)``, zero mean, unit variance before ``gain``.

    ``waves`` (K, 3) in rad/mm, ``phases`` (K,), ``gain`` scales the unit-variance field.
    """

    waves: np.ndarray
    phases: np.ndarray
    gain: float = 1.0

    @classmethod
    def random(cls, rng: np.random.Generator, wavelength_mm: float, n_waves: int = 8,
               gain: float = 1.0, anisotropy: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> "SmoothField":
        """Waves with random directions and wavelengths within x0.7..1.4 of ``wavelength_mm``."""
        direction = rng.normal(size=(n_waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lengths = wavelength_mm * rng.uniform(0.7, 1.4, size=n_waves)
        waves = direction * (2 * np.pi / lengths)[:, None] * np.asarray(anisotropy)[None, :]
        phases = rng.uniform(0, 2 * np.pi, size=n_waves)
        return cls(waves, phases, gain)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Evaluate on broadcastable coordinate arrays (mm); returns float32 of the broadcast shape."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        out = np.zeros(shape, np.float32)
        norm = self.gain * np.sqrt(2.0 / len(self.phases))
        for (kx, ky, kz), phase in zip(self.waves, self.phases):
            out += np.cos(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(phase))
        out *= np.float32(norm)
        return out


def _interp_matrix(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Linear-interpolation weights (len(fine), len(coarse)) from a regular coarse axis to ``fine``."""
    pos = np.clip((fine - coarse[0]) / (coarse[1] - coarse[0]), 0, len(coarse) - 1 - 1e-6)
    lo = np.floor(pos).astype(int)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((len(fine), len(coarse)), np.float32)
    m[np.arange(len(fine)), lo] = 1 - w
    m[np.arange(len(fine)), lo + 1] = w
    return m


def field_on_axes(field: SmoothField, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                  step_mm: float) -> np.ndarray:
    """Evaluate ``field`` on a coarse lattice of ``step_mm`` and interpolate to the grid axes.

    ``xs, ys, zs``: world coordinates (mm) of the grid axes; returns (len(xs), len(ys), len(zs)).
    Cheap for wide, slowly varying fields (textures, bowel gas): cost is the coarse lattice plus
    three small matrix products.
    """
    axes = []
    for a in (xs, ys, zs):
        n = max(2, int(np.ceil((a.max() - a.min()) / step_mm)) + 2)
        axes.append(a.min() - step_mm / 2 + step_mm * np.arange(n))
    cx, cy, cz = axes
    coarse = field(cx[:, None, None], cy[None, :, None], cz[None, None, :])
    out = np.tensordot(_interp_matrix(xs, cx), coarse, axes=(1, 0))
    out = np.tensordot(_interp_matrix(ys, cy), out, axes=(1, 1)).transpose(1, 0, 2)
    out = np.tensordot(out, _interp_matrix(zs, cz), axes=(2, 1))
    return np.ascontiguousarray(out, dtype=np.float32)


def noise_texture(rng: np.random.Generator, shape: tuple[int, int, int], kind: str,
                  corr_px: float) -> np.ndarray:
    """Unit-std CT noise (X, Y, Z) float32, correlated in-plane only (slices reconstruct independently).

    ``kind``: ``"white"`` (FBP soft kernel: slight correlation ``corr_px``), ``"blotchy"`` (iterative
    reconstruction: correlated at ``corr_px`` plus a coarser blotch component), ``"sharp"``
    (sharp kernel: high-pass, fine grain).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    if kind == "white":
        out = ndimage.gaussian_filter(white, (corr_px, corr_px, 0)) if corr_px > 0 else white
    elif kind == "blotchy":
        fine = ndimage.gaussian_filter(white, (corr_px, corr_px, 0))
        coarse = ndimage.gaussian_filter(white, (2.5 * corr_px, 2.5 * corr_px, 0))
        out = fine / fine.std() + 0.8 * coarse / coarse.std()
    elif kind == "sharp":
        out = white - ndimage.gaussian_filter(white, (max(corr_px, 0.7),) * 2 + (0,))
    else:
        raise ValueError(f"noise kind {kind!r}: choose white, blotchy or sharp")
    return out / np.float32(out.std())
