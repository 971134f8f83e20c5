"""Dataset fingerprint: what every case looks like, read once, summarised per site.

:func:`case_fingerprint` reads one case (image and label, nibabel) and returns plain numbers:

- ``spacing`` and ``shape`` in RAS axis order ``(X, Y, Z)`` (the order of ``data.spacing`` after the
  pipeline's ``Orientationd``), ``slice_thickness`` = the Z (cranio-caudal) spacing. NIfTI stores no
  separate slice thickness: the inter-slice distance is what is reported;
- ``orientation`` (``nibabel.aff2axcodes``, e.g. ``LAI``) and the stored ``dtype``;
- intensity percentiles (:data:`PERCENTILES`) inside the body (HU > ``BODY_HU``, the same rule as the
  pipeline's body crop) and inside the label (label > 0), each over every voxel of that mask;
- ``label_ml``: label volume in ml; plus a seeded sample of at most :data:`SAMPLE_VOXELS` label
  voxels, from which site-level foreground percentiles are pooled (nnU-Net's rule: each case
  contributes the same number of samples, so large pancreases do not dominate).

:func:`fingerprint_cases` runs that over a list of cases in worker processes (``workers``; one
process reads one case, so memory is bounded by one scan per worker) and :func:`summarise_sites`
turns the per-case rows into per-site distributions; :func:`site_differences` says how each site
differs from a source site. Tables, JSON/CSV and the figure: :mod:`dualssl.data.fingerprint_io`.

Statistics assume every case of a site was acquired the same way (a site is a scanner/protocol);
medians and 10th/90th percentiles are over cases, not voxels, except the pooled foreground
percentiles.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import nibabel as nib
import numpy as np

from dualssl.data.datalist import Case, DatasetError

BODY_HU = -500.0
"""Voxels above this HU are the body (must equal :data:`dualssl.data.transforms.BODY_HU`)."""
PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
SAMPLE_VOXELS = 10_000
"""Label voxels sampled per case for the site's pooled foreground percentiles (nnU-Net: 10,000)."""


@dataclass
class CaseFingerprint:
    """Numbers of one case (see the module docstring); plain Python, JSON-ready."""

    case_id: str
    site: str
    image: str
    spacing: list[float]
    shape: list[int]
    slice_thickness: float
    orientation: str
    dtype: str
    body_percentiles: list[float]
    body_mean: float
    label_percentiles: list[float]
    label_mean: float
    label_ml: float
    label_sample: list[float] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        """A flat CSV row (no sample)."""
        out = {"case_id": self.case_id, "site": self.site, "image": self.image,
               "orientation": self.orientation, "dtype": self.dtype,
               "slice_thickness": self.slice_thickness, "label_ml": self.label_ml,
               "body_mean": self.body_mean, "label_mean": self.label_mean}
        for axis, s, n in zip("xyz", self.spacing, self.shape):
            out[f"spacing_{axis}"], out[f"shape_{axis}"] = s, n
        for p, b, f in zip(PERCENTILES, self.body_percentiles, self.label_percentiles):
            out[f"body_p{p:g}"], out[f"label_p{p:g}"] = b, f
        return out


def _ras_order(affine: np.ndarray) -> list[int]:
    """For each RAS axis (X, Y, Z), the index of the voxel axis that runs along it."""
    ornt = nib.orientations.io_orientation(affine)  # row i: voxel axis i -> world axis ornt[i, 0]
    order = [0, 0, 0]
    for voxel_axis, (world_axis, _) in enumerate(ornt[:3]):
        order[int(world_axis)] = voxel_axis
    return order


def _percentiles(values: np.ndarray) -> list[float]:
    if values.size == 0:
        return [math.nan] * len(PERCENTILES)
    return [float(v) for v in np.percentile(values, PERCENTILES)]


def case_fingerprint(case: Case, seed: int = 0) -> CaseFingerprint:
    """Read one case and measure it. Raises :class:`DatasetError` naming the file it cannot read.

    Memory: the image as stored (e.g. int16) plus one float32 copy of the body voxels.
    """
    try:
        img = nib.load(case.image)
        image = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel/zlib/EOF errors carry no file name
        raise DatasetError(f"{case.image}: cannot read the image ({type(exc).__name__}: {exc}); "
                           "re-export or re-download it") from exc
    try:
        label = np.asanyarray(nib.load(case.label).dataobj) > 0
    except Exception as exc:
        raise DatasetError(f"{case.label}: cannot read the label ({type(exc).__name__}: {exc}); "
                           "re-export or re-download it") from exc
    image = image.reshape(image.shape[:3])
    label = label.reshape(label.shape[:3])
    if image.shape != label.shape:
        raise DatasetError(f"{case.label}: label shape {label.shape} differs from image shape {image.shape} "
                           f"of {case.image}; resample the label onto the image grid")
    order = _ras_order(img.affine)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = [zooms[i] for i in order]
    shape = [int(image.shape[i]) for i in order]
    body = image[image > BODY_HU].astype(np.float32)
    fg = image[label].astype(np.float32)
    rng = np.random.default_rng([seed, len(fg)])
    sample = fg if fg.size <= SAMPLE_VOXELS else rng.choice(fg, SAMPLE_VOXELS, replace=False)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    return CaseFingerprint(
        case_id=case.case_id, site=case.site, image=case.image, spacing=spacing, shape=shape,
        slice_thickness=spacing[2], orientation="".join(nib.aff2axcodes(img.affine)),
        dtype=str(img.get_data_dtype()), body_percentiles=_percentiles(body),
        body_mean=float(body.mean()) if body.size else math.nan, label_percentiles=_percentiles(fg),
        label_mean=float(fg.mean()) if fg.size else math.nan, label_ml=float(label.sum()) * voxel_ml,
        label_sample=[float(v) for v in sample])


def fingerprint_cases(cases: Sequence[Case], workers: int = 1,
                      progress: Callable[[int, int], None] | None = None) -> list[CaseFingerprint]:
    """:func:`case_fingerprint` of every case, in ``workers`` processes (one case per task), in the
    order of ``cases``. The first unreadable case raises its :class:`DatasetError` (file named)."""
    if workers <= 1 or len(cases) <= 1:
        out = []
        for i, case in enumerate(cases):
            out.append(case_fingerprint(case))
            if progress:
                progress(i + 1, len(cases))
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(case_fingerprint, c) for c in cases]
        out = []
        for i, f in enumerate(futures):
            out.append(f.result())
            if progress:
                progress(i + 1, len(cases))
        return out


def _dist(values: Iterable[float]) -> dict[str, float]:
    """Median, 10th/90th percentiles, min and max over cases."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {k: math.nan for k in ("median", "p10", "p90", "min", "max")}
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max())}


def summarise_sites(rows: Sequence[CaseFingerprint]) -> dict[str, dict[str, Any]]:
    """Per site: ``count``; ``spacing`` / ``shape`` (a :func:`_dist` per RAS axis); ``slice_thickness``,
    ``label_ml`` (distributions over cases); ``orientation`` / ``dtype`` (counts of each value);
    ``body_percentiles`` (median over cases of each case percentile); ``foreground_percentiles``
    (pooled over the per-case label samples) and ``foreground_mean`` / ``foreground_std``."""
    sites: dict[str, list[CaseFingerprint]] = {}
    for r in rows:
        sites.setdefault(r.site, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for site, cases in sorted(sites.items()):
        pooled = np.concatenate([np.asarray(c.label_sample, dtype=np.float64) for c in cases])
        out[site] = {
            "count": len(cases),
            "spacing": [_dist(c.spacing[a] for c in cases) for a in range(3)],
            "shape": [_dist(c.shape[a] for c in cases) for a in range(3)],
            "slice_thickness": _dist(c.slice_thickness for c in cases),
            "orientation": dict(Counter(c.orientation for c in cases)),
            "dtype": dict(Counter(c.dtype for c in cases)),
            "body_percentiles": {f"p{p:g}": float(np.nanmedian([c.body_percentiles[i] for c in cases]))
                                 for i, p in enumerate(PERCENTILES)},
            "foreground_percentiles": {f"p{p:g}": v for p, v in zip(PERCENTILES, _percentiles(pooled))},
            "foreground_mean": float(pooled.mean()) if pooled.size else math.nan,
            "foreground_std": float(pooled.std()) if pooled.size else math.nan,
            "label_ml": _dist(c.label_ml for c in cases),
        }
    return out


@dataclass(frozen=True)
class Tolerances:
    """When a site is said to differ from the source (each a documented judgement, not a test)."""

    spacing_rel: float = 0.2
    """Median in-plane spacing or slice thickness differing by more than this fraction."""
    intensity_hu: float = 20.0
    """Pooled foreground median, or body median, differing by more than this many HU."""
    spread_rel: float = 0.3
    """Foreground 5-95 percentile spread differing by more than this fraction (noise, contrast)."""
    volume_rel: float = 0.3
    """Median label volume differing by more than this fraction."""


def site_differences(summary: dict[str, dict[str, Any]], source: str,
                     tol: Tolerances = Tolerances()) -> dict[str, list[str]]:
    """For every site but ``source``: sentences naming what differs from the source, with both values."""
    if source not in summary:
        raise DatasetError(f"source site {source!r} is not in the fingerprint (sites: {', '.join(summary)})")
    ref = summary[source]
    out: dict[str, list[str]] = {}
    for site, s in summary.items():
        if site == source:
            continue
        notes: list[str] = []
        for axis, name in ((0, "in-plane spacing X"), (1, "in-plane spacing Y"), (2, "slice thickness")):
            a, b = ref["spacing"][axis]["median"], s["spacing"][axis]["median"]
            if abs(b - a) > tol.spacing_rel * a:
                notes.append(f"{name} {b:.2f} mm vs {a:.2f} mm")
        if set(s["orientation"]) != set(ref["orientation"]):
            notes.append(f"orientation {'/'.join(s['orientation'])} vs {'/'.join(ref['orientation'])}")
        if set(s["dtype"]) != set(ref["dtype"]):
            notes.append(f"dtype {'/'.join(s['dtype'])} vs {'/'.join(ref['dtype'])}")
        fa, fb = ref["foreground_percentiles"]["p50"], s["foreground_percentiles"]["p50"]
        if abs(fb - fa) > tol.intensity_hu:
            notes.append(f"label median intensity {fb:.0f} HU vs {fa:.0f} HU")
        ba, bb = ref["body_percentiles"]["p50"], s["body_percentiles"]["p50"]
        if abs(bb - ba) > tol.intensity_hu:
            notes.append(f"body median intensity {bb:.0f} HU vs {ba:.0f} HU")
        sa = ref["foreground_percentiles"]["p95"] - ref["foreground_percentiles"]["p5"]
        sb = s["foreground_percentiles"]["p95"] - s["foreground_percentiles"]["p5"]
        if sa > 0 and abs(sb - sa) > tol.spread_rel * sa:
            notes.append(f"label intensity spread (p5-p95) {sb:.0f} HU vs {sa:.0f} HU")
        va, vb = ref["label_ml"]["median"], s["label_ml"]["median"]
        if va > 0 and abs(vb - va) > tol.volume_rel * va:
            notes.append(f"label volume {vb:.1f} ml vs {va:.1f} ml")
        out[site] = notes
    return out


def to_json(rows: Sequence[CaseFingerprint], summary: dict[str, dict[str, Any]],
            differences: dict[str, list[str]] | None = None, source: str | None = None) -> dict[str, Any]:
    """Everything in one JSON-ready dict (per-case rows without their samples)."""
    cases = []
    for r in rows:
        d = asdict(r)
        d.pop("label_sample")
        cases.append(d)
    return {"percentiles": list(PERCENTILES), "body_hu": BODY_HU, "source_site": source,
            "sites": summary, "differences": differences or {}, "cases": cases}
