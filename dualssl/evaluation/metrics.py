"""Segmentation metrics: per case, per site and across unseen sites (nnU-Net / Touchstone style).

Per case (``case_metrics``): Dice, Jaccard, NSD (normalised surface Dice at ``NSD_TOLERANCE_MM`` = 2 mm,
MONAI's ``compute_surface_dice``), HD95 and symmetric ASD in mm, all spacing-aware. Empty masks:

* label and prediction both empty: Dice 1, Jaccard 1, NSD 1, HD95 0 mm, ASD 0 mm (nothing to find,
  nothing found);
* prediction empty, label not (a *missed* case): Dice 0, Jaccard 0, NSD 0, HD95 = ASD = NaN. A surface
  distance to nothing is undefined; such a case is counted in ``n_missed`` instead of entering the
  HD95/ASD means as some made-up distance;
* label empty, prediction not (a *spurious* case): Dice 0, Jaccard 0, NSD 0, HD95 = ASD = NaN, counted
  in ``n_spurious``.

Distances that do not reward misses (``penalised_distances``): ``hd95_penalised`` and
``asd_penalised`` equal HD95 and ASD where both masks are non-empty (0 where both are empty), and the
documented worst value ``missed_distance_mm`` (the diagonal of the case's image extent in mm: no two
points of the scan are further apart) for a missed or spurious case. A mean of the plain HD95 skips
the misses, so an arm that misses the hard cases looks better; rank arms on the penalised variant and
read the plain mean next to ``n_missed``.

Per site (``summarise``): ``dice_mean, dice_median, dice_std, dice_min, failure_rate`` (fraction of
cases with Dice < ``FAILURE_DICE`` = 0.5), ``jaccard_mean/std, nsd_mean/std``, ``hd95_mean/std`` and
``asd_mean/std`` over the cases where both masks are non-empty, ``hd95_penalised_mean/std`` and
``asd_penalised_mean/std`` over every case (NaN when the rows lack them), ``n_missed``, ``n_spurious``.
Every std is a SAMPLE standard deviation (``ddof=1``), NaN when fewer than two values exist (a site
with one case has ``dice_std`` NaN, written as null in JSON).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

METRICS: tuple[str, ...] = ("dice", "jaccard", "nsd", "hd95", "asd")
"""Per-case metric names: the columns of ``per_case.csv`` and the stems of the per-site ``<name>_mean``."""
PENALISED: dict[str, str] = {"hd95_penalised": "hd95", "asd_penalised": "asd"}
"""Penalised distance -> the distance it stands for; a missed or spurious case scores
``missed_distance_mm`` instead of NaN (``penalised_distances``)."""
NSD_TOLERANCE_MM = 2.0
"""Tolerance of the normalised surface Dice, in mm."""
FAILURE_DICE = 0.5
"""A case with Dice below this is a failure (``failure_rate``), as in Touchstone."""
SITE_KEYS: tuple[str, ...] = (
    "n", "dice_mean", "dice_median", "dice_std", "dice_min", "failure_rate", "jaccard_mean", "jaccard_std",
    "nsd_mean", "nsd_std", "hd95_mean", "hd95_std", "asd_mean", "asd_std", "hd95_penalised_mean",
    "hd95_penalised_std", "asd_penalised_mean", "asd_penalised_std", "n_missed", "n_spurious")
"""Numeric per-site statistics of ``summarise`` (besides ``source`` and ``dice_min_case``)."""
ACROSS_KEYS: tuple[str, ...] = ("mean_unseen_dice", "worst_site_dice", "std_across_sites", "stability",
                                "failure_rate")
"""Numeric across-unseen-site statistics of ``summarise`` (besides the lists and ``worst_site``)."""

_CROP_MARGIN = 2  # voxels kept around the union of the masks; >= 1 keeps surfaces unchanged
KDTREE_MAX_SURFACE = 300_000
"""Above this many surface voxels (both masks), ``case_metrics(method="auto")`` uses distance transforms."""


def _as_bool_volume(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(X,Y,Z) or (1,X,Y,Z) array/tensor of labels -> (X,Y,Z) bool (foreground = non-zero)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3D mask (X,Y,Z) or (1,X,Y,Z), got shape {tuple(arr.shape)}")
    return arr != 0


def _union_crop(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a margin (metrics are unchanged)."""
    coords = np.argwhere(pred | label)
    lo = np.maximum(coords.min(axis=0) - _CROP_MARGIN, 0)
    hi = np.minimum(coords.max(axis=0) + 1 + _CROP_MARGIN, pred.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return pred[box], label[box]


def case_metrics(pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor,
                 spacing: Sequence[float], *, method: str = "auto",
                 nsd_tolerance_mm: float = NSD_TOLERANCE_MM) -> dict[str, float]:
    """Dice, Jaccard, NSD, HD95 (mm) and symmetric ASD (mm) of one binary prediction against its label.

    Args:
        pred: predicted mask ``(X,Y,Z)`` or ``(1,X,Y,Z)``; any non-zero voxel is foreground.
        label: reference mask of the same shape.
        spacing: voxel size in mm along ``(X, Y, Z)``.
        method: how surface distances are found, with identical definitions and results:
            ``"monai"`` (MONAI's ``compute_hausdorff_distance`` / ``compute_average_surface_distance`` /
            ``compute_surface_dice``, a KD-tree on the CPU), ``"edt"`` (scipy's exact Euclidean distance transform) or
            ``"auto"``: MONAI unless the surfaces hold more than ``KDTREE_MAX_SURFACE`` voxels. A
            KD-tree is slow for a large, ragged prediction far from the label (an untrained net on a
            512x512x240 scan: about 4 minutes against 30 s for the distance transform).
        nsd_tolerance_mm: the NSD counts surface voxels within this distance (mm) of the other surface.

    Returns ``{"dice", "jaccard", "nsd", "hd95", "asd"}``; empty masks as in the module docstring.
    NSD follows MONAI's ``compute_surface_dice`` (surface voxels, not sub-voxel areas): the surface
    voxels of both masks within the tolerance of the other surface, over all surface voxels.
    HD95 follows MONAI: the 95th percentile of the directed surface distances pred->label and
    label->pred, each taken separately, then the larger of the two. ASD is the mean of both directed
    distance sets together. Surfaces are mask voxels with a 6-neighbour outside the mask.
    """
    if method not in ("auto", "monai", "edt"):
        raise ValueError(f"method: choose auto, monai or edt, got {method!r}")
    p = _as_bool_volume(pred, "pred")
    y = _as_bool_volume(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"pred shape {p.shape} != label shape {y.shape}: resample the prediction onto "
                         f"the label's grid first")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing: expected three positive voxel sizes in mm, got {spacing}")

    if not (nsd_tolerance_mm >= 0 and math.isfinite(nsd_tolerance_mm)):
        raise ValueError(f"nsd_tolerance_mm: expected a finite distance >= 0 mm, got {nsd_tolerance_mm}")

    has_p, has_y = bool(p.any()), bool(y.any())
    if not has_p and not has_y:
        return {"dice": 1.0, "jaccard": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0}
    if not has_p or not has_y:
        return {"dice": 0.0, "jaccard": 0.0, "nsd": 0.0, "hd95": math.nan, "asd": math.nan}

    # MONAI on first use: importing this module (site keys, summaries) must stay cheap (dualssl.evaluation)
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_iou, compute_surface_dice)

    p, y = _union_crop(p, y)
    yp = torch.from_numpy(p)[None, None].float()
    yt = torch.from_numpy(y)[None, None].float()
    out = {"dice": float(compute_dice(yp, yt, include_background=True, ignore_empty=False)[0, 0]),
           "jaccard": float(compute_iou(yp, yt, include_background=True, ignore_empty=False)[0, 0])}
    edges_p, edges_y = _surface(p), _surface(y)
    if method == "edt" or (method == "auto" and int(edges_p.sum() + edges_y.sum()) > KDTREE_MAX_SURFACE):
        out.update(_edt_distances(edges_p, edges_y, spacing, nsd_tolerance_mm))
        return {k: out[k] for k in METRICS}
    with warnings.catch_warnings():  # MONAI 1.5-1.6 warns about its own internal use of a deprecated argument
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        out["hd95"] = float(compute_hausdorff_distance(yp, yt, include_background=True, percentile=95,
                                                       spacing=spacing)[0, 0])
        out["asd"] = float(compute_average_surface_distance(yp, yt, include_background=True, symmetric=True,
                                                            spacing=spacing)[0, 0])
        out["nsd"] = float(compute_surface_dice(yp, yt, [float(nsd_tolerance_mm)], include_background=True,
                                                spacing=spacing)[0, 0])
    return {k: out[k] for k in METRICS}


def missed_distance_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The worst distance a case can have: the diagonal of its image extent, ``|shape * spacing|`` in mm.

    Args:
        shape: the label's grid ``(X, Y, Z)`` in voxels (a leading channel of 1 is ignored).
        spacing: voxel size in mm along ``(X, Y, Z)``.
    """
    dims = [int(n) for n in shape][-3:]
    if len(dims) != 3 or len(spacing) != 3:
        raise ValueError(f"missed_distance_mm: expected a 3D shape and spacing, got {tuple(shape)}, {tuple(spacing)}")
    return float(np.sqrt(sum((n * float(s)) ** 2 for n, s in zip(dims, spacing))))


def penalised_distances(metrics: Mapping[str, float], shape: Sequence[int],
                        spacing: Sequence[float]) -> dict[str, float]:
    """``hd95_penalised`` and ``asd_penalised`` of one case from its ``case_metrics``.

    A finite distance is kept; a NaN one (prediction or label empty, not both) becomes
    ``missed_distance_mm(shape, spacing)``, so a miss counts as the worst possible distance instead of
    leaving the mean. ``shape`` is the label's grid ``(X, Y, Z)``, ``spacing`` its voxel size in mm.
    """
    worst = missed_distance_mm(shape, spacing)
    out = {}
    for name, base in PENALISED.items():
        value = float(metrics[base])
        out[name] = value if math.isfinite(value) else worst
    return out


def probability_metrics(prob: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Graded agreement of a foreground probability map with a label, for when hard masks all score
    Dice 0 and cannot rank models (e.g. a phantom-trained net on a real scan).

    Args:
        prob: ``(X,Y,Z)`` foreground probabilities in [0, 1].
        label: ``(X,Y,Z)`` mask on the same grid (non-zero = foreground).

    Returns:
        ``soft_dice`` (2 sum(p y) / (sum p + sum y)), ``auroc`` (probability that a label voxel
        outranks a background voxel, ties counted half; MONAI's ``compute_roc_auc``; NaN when either
        class is absent) and ``mean_prob_in_label``.
    """
    p = np.asarray(prob, dtype=np.float64)
    y = _as_bool_volume(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"prob {p.shape} and label {y.shape}: expected the same (X,Y,Z) grid")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"prob: values must lie in [0, 1], got [{p.min():.3g}, {p.max():.3g}]")
    from monai.metrics import compute_roc_auc

    denom = p.sum() + y.sum()
    both = 0 < y.sum() < y.size
    return {"soft_dice": float(2 * (p * y).sum() / denom) if denom else 1.0,
            "auroc": float(compute_roc_auc(torch.from_numpy(p.ravel()), torch.from_numpy(y.ravel().astype(np.int64))))
            if both else math.nan,
            "mean_prob_in_label": float(p[y].mean()) if y.any() else math.nan}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a 6-neighbour outside the mask (MONAI's ``get_mask_edges`` without spacing)."""
    return mask ^ ndimage.binary_erosion(mask)


def _edt_distances(edges_p: np.ndarray, edges_y: np.ndarray, spacing: tuple[float, ...],
                   tolerance: float) -> dict[str, float]:
    """HD95, symmetric ASD and NSD from the two surfaces with exact distance transforms (MONAI's definitions)."""
    d_py = ndimage.distance_transform_edt(~edges_y, sampling=spacing)[edges_p]
    d_yp = ndimage.distance_transform_edt(~edges_p, sampling=spacing)[edges_y]
    hd95 = max(float(np.percentile(d, 95)) for d in (d_py, d_yp))  # linear, like torch.quantile in MONAI
    both = np.concatenate([d_py, d_yp])
    return {"hd95": hd95, "asd": float(both.mean()), "nsd": float((both <= tolerance).mean())}


def _finite(values: Iterable[Any]) -> np.ndarray:
    """Float array of the values that are finite numbers (NaN, None and empty cells dropped)."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=np.float64)


def sample_std(values: Iterable[Any]) -> float:
    """Sample standard deviation (``ddof=1``) of the finite values; NaN when fewer than two exist."""
    arr = _finite(values)
    return float(arr.std(ddof=1)) if arr.size >= 2 else math.nan


def _mean(values: Iterable[Any]) -> float:
    arr = _finite(values)
    return float(arr.mean()) if arr.size else math.nan


def _flag(value: Any) -> bool:
    """A boolean cell from memory (True/False) or from a CSV ("True"/"False"/"1"/"0")."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _site_summary(rows: list[Mapping[str, Any]], is_source: bool) -> dict[str, Any]:
    dice = np.asarray([float(r["dice"]) for r in rows], dtype=np.float64)
    worst = int(np.argmin(dice))
    out: dict[str, Any] = {
        "n": len(rows),
        "source": is_source,
        "dice_mean": float(dice.mean()),
        "dice_median": float(np.median(dice)),
        "dice_std": sample_std(dice),
        "dice_min": float(dice[worst]),
        "dice_min_case": str(rows[worst].get("case_id", worst)),
        "failure_rate": float((dice < FAILURE_DICE).mean()),
    }
    for name in (*METRICS[1:], *PENALISED):
        out[f"{name}_mean"] = _mean(r.get(name) for r in rows)
        out[f"{name}_std"] = sample_std(r.get(name) for r in rows)
    out["n_missed"] = sum(_flag(r["empty_pred"]) and not _flag(r["empty_label"]) for r in rows)
    out["n_spurious"] = sum(_flag(r["empty_label"]) and not _flag(r["empty_pred"]) for r in rows)
    return out


REQUIRED_FIELDS: tuple[str, ...] = ("site", *METRICS, "empty_pred", "empty_label")
"""What ``summarise`` reads of each per-case row (``case_id`` too, when present)."""


def summarise(rows: Sequence[Mapping[str, Any]], source_sites: Sequence[str]) -> dict[str, Any]:
    """Per-site and across-unseen-site statistics of per-case rows.

    Args:
        rows: one mapping per case with ``REQUIRED_FIELDS`` (``site``, the ``METRICS``, ``empty_pred``,
            ``empty_label``); ``case_id`` names the worst case. Rows read back from ``per_case.csv``
            (strings) work too.
        source_sites: training sites; every other site in ``rows`` is an unseen site.

    Returns:
        ``{"per_site": {site: {source, dice_min_case, *SITE_KEYS}}, "across_sites": {unseen_sites,
        n_sites, n_cases, worst_site, *ACROSS_KEYS}}`` where, over the unseen sites only,
        ``mean_unseen_dice`` is the mean of the site Dice means, ``std_across_sites`` their sample std,
        ``worst_site_dice`` the lowest site mean, ``stability`` the sample std of per-case Dice over
        every unseen case and ``failure_rate`` the fraction of unseen cases with Dice < 0.5.
        Across-site values are None when no unseen site is present.
    """
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] (case {row.get('case_id', '?')}): missing field(s) {missing}")
    sources = set(source_sites)
    by_site: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_site.setdefault(str(row["site"]), []).append(row)
    per_site = {site: _site_summary(site_rows, site in sources) for site, site_rows in sorted(by_site.items())}

    unseen = [s for s in per_site if s not in sources]
    across: dict[str, Any] = {"unseen_sites": unseen, "n_sites": len(unseen),
                              "n_cases": sum(per_site[s]["n"] for s in unseen)}
    if unseen:
        means = np.asarray([per_site[s]["dice_mean"] for s in unseen])
        worst = unseen[int(np.argmin(means))]
        unseen_dice = np.asarray([float(r["dice"]) for s in unseen for r in by_site[s]])
        across.update(mean_unseen_dice=float(means.mean()), std_across_sites=sample_std(means), worst_site=worst,
                      worst_site_dice=per_site[worst]["dice_mean"], stability=sample_std(unseen_dice),
                      failure_rate=float((unseen_dice < FAILURE_DICE).mean()))
    else:
        across.update({key: None for key in ("worst_site", *ACROSS_KEYS)})
    return {"per_site": per_site, "across_sites": across}
