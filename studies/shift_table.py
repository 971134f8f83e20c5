"""The domain-shift study's tables: ``cases.csv`` (one row per case per cell) and ``cells.csv``.

``cases.csv`` is what ``dualssl.stats`` and ``dualssl.report`` read: each finished cell's evaluation
files (``per_case.csv``: source validation + the unseen sites' report part; ``oracle_per_case.csv``:
their selection part) with the cell's arm, seed and source site, the case's role (``source`` /
``unseen``), its part, and the severity-sweep axis and value of sweep sites; the base site's own
rows are repeated as each sweep axis' severity 0 (``part`` = ``severity-0``). ``hd95``/``asd`` are NaN
for a missed case (``missed`` = 1: empty prediction, non-empty label); ``hd95_penalised`` /
``asd_penalised`` count it as the case's worst distance (``dualssl.evaluation.metrics.penalised_distances``).

``cells.csv`` has one row per cell: its status and selection numbers, and its budget (:func:`budget_columns`):
``budget`` (the ``--budgets`` label, empty without), ``budget_iterations``, ``batch_size`` (patches per
step), ``patch_size``, ``patch_voxels``, ``wall_s`` and ``system`` (an nnU-Net cell: its own plan's patch
and batch, from the cell's ``trial.json``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from dualssl.config import Config
from dualssl.data.phantom.sweeps import severity_zero_rows

CASE_COLUMNS = ("arm", "seed", "source_site", "site", "case_id", "role", "part", "axis", "severity",
                "dice", "jaccard", "nsd", "hd95", "asd", "missed", "hd95_penalised", "asd_penalised", "pred_ml",
                "label_ml", "cell", "trial_id")
DISTANCE_COLUMNS = ("hd95", "asd", "hd95_penalised", "asd_penalised")


def _error_line(error: BaseException | None, limit: int = 500) -> str:
    """The last line of a trial's error (the exception that ended it), '' when it has none."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:limit]


def _flag(text: object) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes")


def case_rows(folder: Path, cell: dict[str, Any], trial_id: str, sweeps: dict[str, dict[str, Any]],
              sources: list[str]) -> list[dict[str, Any]]:
    """Rows of ``cases.csv`` from one cell's evaluation files (report and oracle-selection parts)."""
    rows = []
    for name, part in (("per_case.csv", None), ("oracle_per_case.csv", "selection")):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                site = r["site"]
                role = "source" if site in sources else "unseen"
                sweep = sweeps.get(site, {})
                rows.append({
                    "arm": cell["study.arm"], "seed": cell["optim.seed"], "source_site": sources[0], "site": site,
                    "case_id": r["case_id"], "role": role, "part": part or ("source" if role == "source" else "report"),
                    "axis": sweep.get("axis", ""), "severity": sweep.get("value", ""),
                    **{k: r.get(k, "") for k in ("dice", "jaccard", "nsd", *DISTANCE_COLUMNS, "pred_ml", "label_ml")},
                    "missed": int(_flag(r.get("empty_pred")) and not _flag(r.get("empty_label"))),
                    "cell": cell["study.cell"], "trial_id": trial_id})
    return rows + severity_zero_rows(rows, sweeps)  # the base site's own cases: each curve's severity 0


def budget_columns(cfg: Config, settings: Any, metrics: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """A cell's budget for ``cells.csv``.

    Our engine: ``optim.epochs x optim.steps_per_epoch`` iterations (NaN for one loader pass an epoch),
    ``data.batch_size x data.samples_per_volume x workers`` patches a step (DDP: every worker steps its
    own batch), ``data.patch_size``. An nnU-Net cell (``settings.peer``): the iterations it trained
    (whole epochs of ``iterations_per_epoch``), its plan's batch and patch from the cell's ``trial.json``
    (unknown when the cell did not finish). ``wall_s``: Tune's ``time_total_s`` of the trial, else the
    trainable's own timing.
    """
    spe = cfg.optim.steps_per_epoch
    iterations = cfg.optim.epochs * spe if spe > 0 else math.nan
    wall = next((float(metrics[k]) for k in ("time_total_s", "time/trial_s", "time/total_s") if k in metrics),
                math.nan)
    row = {"budget": settings.budget or "", "budget_iterations": iterations, "wall_s": wall}
    if not settings.peer:
        patch = [int(p) for p in cfg.data.patch_size]
        batch = cfg.data.batch_size * cfg.data.samples_per_volume * settings.workers
        return {**row, "batch_size": batch, "patch_size": "x".join(map(str, patch)),
                "patch_voxels": math.prod(patch), "system": "dualssl engine"}
    info = {}
    if folder is not None and (folder / "trial.json").is_file():
        info = json.loads((folder / "trial.json").read_text())
    peer = info.get("settings", {})
    if peer.get("iterations") and peer.get("iterations_per_epoch"):
        per_epoch = int(peer["iterations_per_epoch"])
        row["budget_iterations"] = math.ceil(int(peer["iterations"]) / per_epoch) * per_epoch
    patch = [int(p) for p in info.get("patch_size") or []]
    return {**row, "batch_size": info.get("batch_size", math.nan), "patch_size": "x".join(map(str, patch)),
            "patch_voxels": math.prod(patch) if patch else math.nan,
            "system": f"{settings.peer}: " + info.get("plan_label", "nnU-Net pipeline, plan unknown (did not finish)")}


def collect(grid, study_dir: Path, sweeps: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-case rows of every finished cell, one status row per cell)."""
    from studies.trainable import FINAL_KEY, split_config

    cases: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for result in grid:
        cfg, settings = split_config(result.config)
        cell = result.config["study.overrides"]
        trial_id = Path(result.path).name.removeprefix("trial_")
        metrics = dict(result.metrics or {})
        row = {"cell": settings.cell, "arm": settings.arm, "seed": cfg.optim.seed,
               "source_site": cfg.data.source_sites[0], "trial_id": trial_id,
               "status": "completed" if metrics.get(FINAL_KEY) else ("error" if result.error else "incomplete"),
               "best_val_dice": metrics.get(f"best_{cfg.eval.selection_metric}", math.nan),
               "mean_unseen_dice": metrics.get("mean_unseen_dice", math.nan),
               "best_epoch": metrics.get("best_epoch", -1),
               "error": _error_line(result.error)}
        cells.append(row)
        if row["status"] != "completed" or result.checkpoint is None:
            row.update(budget_columns(cfg, settings, metrics, None))
            continue
        folder = study_dir / "cells" / settings.cell
        result.checkpoint.to_directory(str(folder))
        row.update(budget_columns(cfg, settings, metrics, folder))
        cases.extend(case_rows(folder, cell, trial_id, sweeps, cfg.data.source_sites))
    return cases, cells


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...] | None = None) -> Path:
    columns = columns or tuple(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
