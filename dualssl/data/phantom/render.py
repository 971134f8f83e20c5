"""Image formation: organ map -> CT numbers -> slice partial volume, reconstruction blur, noise,
cone-beam artefacts, calibration, stored data type and orientation.

``render_case(site, seed, scale)`` is deterministic in its arguments. Anatomy, acquisition and
noise draw from independent child seeds, so one seed gives the same patient at every ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

from dualssl.data.phantom.anatomy import Anatomy, sample_anatomy
from dualssl.data.phantom.fields import SmoothField, field_on_axes, noise_texture
from dualssl.data.phantom.grid import Grid
from dualssl.data.phantom.options import PhantomOptions, phantom_options
from dualssl.data.phantom.shape_bank import ShapeBank, bank_rng
from dualssl.data.phantom.sites import SiteProfile, get_profile
from dualssl.data.phantom.table import scanner_half_width
from dualssl.data.phantom.tissues import (ORAL_CONTRAST_HU, SPLEEN_ARTERIAL_TEXTURE_HU, TEXTURE_HU, Tissue,
                                          hu_range)

MAX_SUBSLICES = 5
"""Sub-slices rendered per thick slice for partial-volume averaging."""
_MARGIN_MM = 4.0
_TISSUES = list(Tissue)
_DRAWN = [t for t in _TISSUES if t is not Tissue.TABLE]
"""Tissues whose HU each case draws in one loop (the table's is drawn after every other value, so that
adding it left the values of every earlier case unchanged)."""


@dataclass(frozen=True)
class PhantomCase:
    """One rendered case, arrays in the stored orientation (all the same shape).

    Unpacks as ``image, label, affine, dtype = render_case(...)``.
    """

    image: np.ndarray
    """Stored CT values (site dtype): ``hu_scale * HU + hu_offset``."""
    label: np.ndarray
    """uint8 pancreas mask: 1 where at least half of the voxel's slab is pancreas."""
    affine: np.ndarray
    """4x4 voxel-to-world (RAS mm) of the stored array."""
    dtype: np.dtype
    organs: np.ndarray
    """uint8 :class:`Tissue` of each voxel (centre of its slab)."""
    pure: np.ndarray
    """bool: the voxel's whole slab is one tissue (no partial volume along z)."""
    info: dict = field(default_factory=dict)
    """Site, seed, scale, spacing, orientation, drawn acquisition values and true tissue HU."""

    def __iter__(self) -> Iterator:
        return iter((self.image, self.label, self.affine, self.dtype))


def render_case(site: str | SiteProfile, seed: int, scale: float = 0.5,
                shape_bank: ShapeBank | str | Path | None = None,
                options: PhantomOptions | str | None = None) -> PhantomCase:
    """Render one case of ``site`` from ``seed`` at ``scale`` (1.0 = clinical voxel sizes; 0.5
    doubles every voxel side). The field of view is cropped to the body and, with the default
    ``options``, from the lower kidney poles to just under the liver dome.

    ``shape_bank``: a folder of real pancreas masks (or a :class:`ShapeBank`): the pancreas is one of
    them, deformed and placed where the procedural one sits; None (default) = the procedural shape.
    ``options``: :class:`~dualssl.data.phantom.options.PhantomOptions` or a preset name
    (``options.PRESETS``: "default", "clinical"): coverage, field of view and table, the pancreas'
    surroundings and its interlobular fat. None = the defaults."""
    options = phantom_options(options)
    profile = get_profile(site)
    if not (isinstance(scale, (int, float)) and 0.05 <= float(scale) <= 1.0):
        raise ValueError(f"scale={scale!r}: must lie in [0.05, 1.0] (1.0 = clinical voxel sizes, "
                         "0.5 = demo size, 0.3 = test size)")
    scale = float(scale)
    s_anat, s_acq, s_noise = np.random.SeedSequence(int(seed)).spawn(3)
    if shape_bank is not None and not isinstance(shape_bank, ShapeBank):
        shape_bank = ShapeBank(shape_bank)
    anatomy = sample_anatomy(np.random.default_rng(s_anat), profile.fatty_range, shape_bank,
                             bank_rng(seed) if shape_bank is not None else None, options)
    acq = _draw_acquisition(np.random.default_rng(s_acq), profile, anatomy)
    grid, n_sub = _grids(anatomy, profile, acq, scale, options.fov)

    fine = _fine_grid(grid, n_sub)
    labels = np.zeros(fine.shape, np.uint8)
    for painter in anatomy.painters:
        painter.apply(labels, fine)

    hu = _tissue_hu(labels, fine, anatomy, profile, acq)
    nx, ny, nz = grid.shape
    hu = hu.reshape(nx, ny, nz, n_sub).mean(axis=3)
    stack = labels.reshape(nx, ny, nz, n_sub)
    organs = stack[..., n_sub // 2]
    pure = (stack == organs[..., None]).all(axis=3)
    label = ((stack == Tissue.PANCREAS).mean(axis=3) >= 0.5).astype(np.uint8)

    hu = _reconstruct(hu, profile, acq, grid, np.random.default_rng(s_noise))
    stored = _store(hu, profile, acq)

    ornt = ornt_transform(axcodes2ornt(tuple("RAS")), axcodes2ornt(tuple(profile.orientation)))
    affine = grid.affine() @ inv_ornt_aff(ornt, grid.shape)
    image, label, organs, pure = (np.ascontiguousarray(apply_orientation(a, ornt))
                                  for a in (stored, label, organs, pure))
    info = {
        "site": profile.name, "seed": int(seed), "scale": scale, "phase": profile.phase,
        "orientation": profile.orientation, "dtype": profile.dtype,
        "spacing_mm": [float(v) for v in grid.spacing], "shape": list(image.shape),
        "clinical_pixel_mm": acq["pixel"], "clinical_slice_mm": acq["slice"], "subslices": n_sub,
        "hu_scale": acq["hu_scale"], "hu_offset": acq["hu_offset"], "noise_hu": acq["noise"],
        "oral_contrast": acq["oral"], "pancreas_fat_fraction": anatomy.pancreas.fat_fraction,
        "pancreas_length_mm": anatomy.pancreas.length_mm,
        "pancreas_ml": float(label.sum() * np.prod(grid.spacing) / 1000.0),
        "tissue_hu": {t.name.lower(): acq["hu"][t] for t in _DRAWN},
        **options.changes(),
    }
    if options.fov == "scanner":
        info["tissue_hu"]["table"] = acq["hu"][Tissue.TABLE]
    if shape_bank is not None:
        info["pancreas_shape"] = f"bank:{anatomy.pancreas.shape.mask.name}"
        info["pancreas_bank_ml"] = anatomy.pancreas.shape.mask.volume_ml
    return PhantomCase(image, label, affine, np.dtype(profile.dtype), organs, pure, info)


def _draw_acquisition(rng: np.random.Generator, p: SiteProfile, anatomy: Anatomy) -> dict:
    """Per-case acquisition values and true tissue HU (one bolus-timing draw shared by organs)."""
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    timing = rng.uniform()
    hu = {}
    for t in _DRAWN:
        lo, hi = hu_range(p.phase, t)
        w = float(np.clip(timing + rng.normal(0, 0.15), 0, 1))
        hu[t] = lo + w * (hi - lo)
    oral = bool(rng.uniform() < p.oral_contrast)
    if oral:
        oral_hu = u(ORAL_CONTRAST_HU)
        for t in (Tissue.BOWEL_CONTENT, Tissue.STOMACH_CONTENT):
            hu[t] = oral_hu * float(rng.uniform(0.6, 1.0))
    size = anatomy.body.a / 160.0
    acq = {
        "pixel": round(u(p.pixel_mm), 4), "slice": float(rng.choice(p.slice_mm)),
        "hu_scale": u(p.hu_scale), "hu_offset": u(p.hu_offset),
        "noise": u(p.noise_hu) * float(np.clip(size, 0.85, 1.2)),
        "fov_circle": u(p.fov_circle_mm), "cupping": u(p.cupping_hu), "oral": oral, "hu": hu,
        "texture": SmoothField.random(rng, 15.0), "mottle": SmoothField.random(rng, 6.0, n_waves=12),
        "shading": SmoothField.random(rng, 120.0, n_waves=4), "ring_phase": u((0.0, 2 * np.pi)),
        "streaks": rng.uniform([0, -60, -1], [np.pi, 60, 1], size=(6, 3)),  # angle, offset mm, sign
    }
    hu[Tissue.TABLE] = u(hu_range(p.phase, Tissue.TABLE))
    acq["fov_half"] = scanner_half_width(rng, anatomy.body.a, anatomy.body.b_post, p.fov_mm)
    return acq


def _grids(anatomy: Anatomy, p: SiteProfile, acq: dict, scale: float, fov: str = "body") -> tuple[Grid, int]:
    """Stored grid (cropped to the body, or the patient's reconstructed square with ``fov="scanner"``;
    within the site's square FOV and any FOV circle) and sub-slices per slice."""
    spacing = np.array([acq["pixel"], acq["pixel"], acq["slice"]]) / scale
    world = anatomy.outline() @ anatomy.rot.T + anatomy.shift
    wlo, whi = world.min(0) - _MARGIN_MM, world.max(0) + _MARGIN_MM
    half = p.fov_mm / 2 if not acq["fov_circle"] else min(p.fov_mm, acq["fov_circle"]) / 2
    if fov == "scanner":
        wlo[:2], whi[:2] = -acq["fov_half"], acq["fov_half"]
    wlo[:2], whi[:2] = np.maximum(wlo[:2], -half), np.minimum(whi[:2], half)
    # z: the crop of the anatomy (tilt moves it little); world z of the patient's axis
    wlo[2], whi[2] = anatomy.z_range[0] + anatomy.shift[2], anatomy.z_range[1] + anatomy.shift[2]
    shape = tuple(int(np.ceil((whi[a] - wlo[a]) / spacing[a])) for a in range(3))
    n_sub = int(np.clip(round(acq["slice"] / acq["pixel"]), 1, MAX_SUBSLICES))
    return Grid(wlo + spacing / 2, spacing, shape, anatomy.rot, anatomy.shift), n_sub


def _fine_grid(grid: Grid, n_sub: int) -> Grid:
    """The grid with each slice split into ``n_sub`` sub-slices (centred within the slab)."""
    dz = grid.spacing[2] / n_sub
    origin = grid.origin.copy()
    origin[2] = grid.origin[2] - grid.spacing[2] / 2 + dz / 2
    return Grid(origin, np.array([grid.spacing[0], grid.spacing[1], dz]),
                (grid.shape[0], grid.shape[1], grid.shape[2] * n_sub), grid.rot, grid.shift)


def _tissue_hu(labels: np.ndarray, grid: Grid, anatomy: Anatomy, p: SiteProfile, acq: dict) -> np.ndarray:
    """True CT numbers (X, Y, Z) float32: tissue values, organ texture, stool mottling, the spleen's
    arterial heterogeneity and the pancreas' interlobular fat."""
    lut = np.array([acq["hu"][t] for t in _TISSUES], np.float32)
    amp = np.array([TEXTURE_HU.get(t, 0.0) for t in _TISSUES], np.float32)
    if p.phase == "pancreatic":
        amp[Tissue.SPLEEN] = SPLEEN_ARTERIAL_TEXTURE_HU
    xs, ys, zs = grid.axes()
    hu = lut[labels]
    hu += amp[labels] * field_on_axes(acq["texture"], xs, ys, zs, step_mm=5.0)
    stool = np.nonzero(labels == Tissue.STOOL)
    if len(stool[0]):
        mottle = acq["mottle"](*(ax[i].astype(np.float32) for ax, i in zip((xs, ys, zs), stool)))
        hu[stool] = np.where(mottle > 1.2, np.float32(-850.0), hu[stool] + 40 * mottle)

    pan = anatomy.pancreas
    box = grid.box(pan.painted)
    if box is not None and pan.fat_fraction > 0:
        inside = labels[box] == Tissue.PANCREAS
        if inside.any():
            x, y, z = (np.broadcast_to(c, inside.shape)[inside] for c in grid.body_coords(box))
            n = pan.fat(x, y, z)
            thr = np.quantile(n, 1.0 - pan.fat_fraction)
            mix = np.clip((n - thr) / 0.15 + 0.5, 0, 1)
            sub = hu[box]
            sub[inside] = (1 - mix) * sub[inside] + mix * np.float32(acq["hu"][Tissue.VISCERAL_FAT])
            hu[box] = sub
    return hu


def _reconstruct(hu: np.ndarray, p: SiteProfile, acq: dict, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """Blur, edge enhancement, cone-beam artefacts and noise, on the stored grid (X, Y, Z)."""
    if p.blur_px > 0:
        hu = ndimage.gaussian_filter(hu, (p.blur_px, p.blur_px, 0))
    if p.sharpen > 0:
        hu = hu + np.float32(p.sharpen) * (hu - ndimage.gaussian_filter(hu, (1.2, 1.2, 0)))
    xs, ys, zs = grid.axes()
    r = np.sqrt(xs[:, None] ** 2 + ys[None, :] ** 2).astype(np.float32)[:, :, None]
    outside = None
    # cupping falls off from the centre of the FOV circle, or of the square FOV when there is none
    radius = (acq["fov_circle"] or p.fov_mm) / 2
    body = hu > -500 if (acq["fov_circle"] or acq["cupping"]) else None
    if acq["cupping"]:
        rel = np.clip(r / radius, 0, 1)
        hu = hu - np.float32(acq["cupping"]) * (1 - rel ** 2) * body
    if acq["fov_circle"]:
        hu = hu + np.float32(60.0) * np.exp(-(radius - r) / 8.0) * body          # truncation rim
        hu = hu + np.float32(p.shading_hu) * field_on_axes(acq["shading"], xs, ys, zs, step_mm=20.0) * body
        ring_r = radius * np.array([0.12, 0.27, 0.41, 0.58, 0.73])
        rings = sum(np.exp(-((r - rr) / 1.5) ** 2) * np.cos(acq["ring_phase"] + 2.1 * i)
                    for i, rr in enumerate(ring_r))
        hu = hu + np.float32(p.ring_hu) * rings
        hu = hu + _streaks(acq["streaks"], xs, ys, np.float32(p.streak_hu))[:, :, None]
        outside = np.broadcast_to(r > radius, hu.shape)
    noise = noise_texture(rng, hu.shape, p.noise_kind, p.noise_corr_px)
    hu = hu + np.float32(acq["noise"]) * noise
    if outside is not None:
        hu = np.where(outside, np.float32(-1000.0), hu)
    return hu.astype(np.float32)


def _streaks(lines: np.ndarray, xs: np.ndarray, ys: np.ndarray, amp: np.float32) -> np.ndarray:
    """Straight bright/dark streaks (X, Y): one per row of ``lines`` (angle, offset mm, sign), 2 mm
    wide, the same in every slice."""
    out = np.zeros((len(xs), len(ys)), np.float32)
    for angle, offset, sign in lines:
        dist = xs[:, None] * np.cos(angle) + ys[None, :] * np.sin(angle) - offset
        out += np.float32(sign) * np.exp(-(dist / 2.0) ** 2).astype(np.float32)
    return amp * out


def _store(hu: np.ndarray, p: SiteProfile, acq: dict) -> np.ndarray:
    """Calibration, clipping to the scanner's range and the stored data type."""
    val = np.float32(acq["hu_scale"]) * hu + np.float32(acq["hu_offset"])
    val = np.clip(val, -1024, 3071)
    if p.dtype == "float32":
        return (np.round(val * 16) / 16).astype(np.float32)   # 1/16 HU steps: compressible, not integer
    return np.round(val).astype(p.dtype)
