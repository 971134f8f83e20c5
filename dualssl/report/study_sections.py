"""Report parts about the study itself rather than one statistic: complete pairs when cells failed,
the arms (where their settings came from, what they change), the cells that did not finish, and the
distance table that does not reward misses.

A study whose cell failed still gets a report: statistics use the cells that finished, and a paired
comparison of an arm with the reference uses only the (seed, source site, site, case) rows present
under both (``complete_pairs``); the counts of what was dropped are shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dualssl.report.document import Section, Table
from dualssl.stats.cases import Row
from dualssl.stats.summary import summarise
from dualssl.stats.tables import format_ci, format_number

PENALISED_METRIC = "hd95_penalised"
"""What arms are ranked on by distance: HD95 with a missed case counted as its worst distance
(``dualssl.evaluation.metrics.penalised_distances``)."""


def arms_section(arm_rows: Sequence[Mapping[str, str]], reference: str) -> Section:
    """Each arm, where its settings came from, and its resolved config differences from ``reference``."""
    table = Table(["arm", "settings from", f"differences from {reference} (resolved config)"],
                  [[r["arm"], r["settings_from"], r["differences"]] for r in arm_rows])
    return Section("Arms", "Every arm trains on the same base config; these are the keys where an arm's "
                           f"resolved config differs from {reference}'s.", table)


def failed_section(failed: Sequence[Mapping[str, Any]], total: int) -> Section:
    """The cells that did not finish: named, with their status and error."""
    table = Table(["cell", "arm", "seed", "source site", "status", "error"],
                  [[str(c.get("cell", "?")), str(c.get("arm", "?")), str(c.get("seed", "?")),
                    str(c.get("source_site", "?")), str(c.get("status", "?")),
                    (str(c.get("error") or "") or "–")[:300]] for c in failed])
    return Section(f"Cells that did not finish ({len(failed)} of {total})",
                   "These cells are left out: every statistic above uses the cells that finished, and a paired "
                   "difference only the cases where both arms' cells finished (counts beside each comparison).",
                   table)


def _floats(rows: Sequence[Row], column: str) -> np.ndarray:
    values = []
    for r in rows:
        try:
            values.append(float(r.get(column, math.nan)))
        except (TypeError, ValueError):
            values.append(math.nan)
    return np.asarray(values, dtype=float)


def distance_section(unseen: Sequence[Row], arms: Sequence[str], *, n_boot: int, seed: int = 0) -> Section | None:
    """Distances on unseen sites, ranked on ``hd95_penalised`` (lower is better), with ``n_missed``
    beside the plain HD95/ASD means (which leave missed cases out). None without the column."""
    if not unseen or PENALISED_METRIC not in unseen[0]:
        return None
    rows = [{**r, PENALISED_METRIC: float(r[PENALISED_METRIC])} for r in unseen
            if str(r.get(PENALISED_METRIC, "")).strip() not in ("", "nan")]
    if not rows:
        return None
    stats = {s["arm"]: s for s in summarise(rows, by=(), metric=PENALISED_METRIC, n_boot=n_boot, seed=seed)}
    body = []
    for arm in sorted(stats, key=lambda a: (stats[a]["mean"], arms.index(a) if a in arms else 0)):
        mine = [r for r in unseen if r["arm"] == arm]
        missed = int(np.nansum(_floats(mine, "missed")))
        hd95, asd, asd_pen = (_floats(mine, c) for c in ("hd95", "asd", "asd_penalised"))
        mean = lambda a: float(np.nanmean(a)) if np.any(~np.isnan(a)) else math.nan  # noqa: E731
        s = stats[arm]
        body.append([arm, str(len(mine)), str(missed), format_ci(s["mean"], s["ci_low"], s["ci_high"], 2),
                     format_number(mean(hd95), 2), format_number(mean(asd_pen), 2), format_number(mean(asd), 2)])
    table = Table(["arm (best first)", "cases", "n_missed", "HD95 penalised (mm) [95% CI]", "HD95 (mm, found only)",
                   "ASD penalised (mm)", "ASD (mm, found only)"], body)
    return Section("Surface distances on unseen sites (misses penalised)",
                   "HD95 and ASD are undefined for a missed case (empty prediction), so their plain means leave "
                   "misses out and reward an arm that misses the hard cases: read them next to n_missed. "
                   "The penalised variants count a missed (or spurious) case as the diagonal of its image extent "
                   "in mm, the worst distance possible; arms are ranked on HD95 penalised.", table)


BUDGET_COLUMNS = ("budget_iterations", "batch_size", "patch_voxels", "wall_s", "system")
"""What ``cells.csv`` says of each cell's budget (``studies/shift_table.py``): optimizer steps, patches
per step, voxels per patch, the cell's wall time in seconds and the system that trained it."""


def _distinct(values: Sequence[Any]) -> str:
    """The distinct values of a column, in order, '/'-joined (integers without decimals); '–' if none."""
    out: list[str] = []
    for v in values:
        try:
            number = float(v)
            text = "–" if math.isnan(number) else (str(int(number)) if number == int(number) else f"{number:g}")
        except (TypeError, ValueError):
            text = str(v) if str(v).strip() else "–"
        if text not in out:
            out.append(text)
    return "/".join(t for t in out if t != "–") or "–"


def budget_section(cells: Sequence[Mapping[str, Any]]) -> Section | None:
    """"Budget and wall time per arm" from ``cells.csv`` rows: each arm's iterations, patches per step,
    patch voxels, system, and its finished cells' wall time (mean, min, max). None without the columns."""
    if not cells or not all(c in cells[0] for c in BUDGET_COLUMNS):
        return None
    arms = list(dict.fromkeys(str(c["arm"]) for c in cells))
    body = []
    for arm in arms:
        mine = [c for c in cells if str(c["arm"]) == arm]
        walls = _floats([c for c in mine if c.get("status") == "completed"], "wall_s")
        walls = walls[~np.isnan(walls)]
        wall = ([format_number(float(walls.mean()), 0), format_number(float(walls.min()), 0),
                 format_number(float(walls.max()), 0)] if walls.size else ["–"] * 3)
        body.append([arm, str(len(mine)), *(_distinct([c[k] for c in mine]) for k in BUDGET_COLUMNS[:3]),
                     str(int(walls.size)), *wall, _distinct([c["system"] for c in mine])])
    table = Table(["arm", "cells", "iterations", "patches per step", "patch voxels", "finished",
                   "wall s (mean)", "wall s (min)", "wall s (max)", "system"], body)
    return Section("Budget and wall time per arm",
                   "Iterations = optimizer steps of a cell (nnU-Net: its training iterations, whole epochs); "
                   "patches per step = training patches in one step over all workers (nnU-Net: its plan's "
                   "batch size); patch voxels = voxels of one training patch (nnU-Net: its plan's patch). "
                   "Wall s = a finished cell's wall time (Tune's time_total_s: start-up, training, validation "
                   "and the evaluation on every site; an nnU-Net cell also plans and preprocesses its data), "
                   "on the study's machine and resources.", table)
