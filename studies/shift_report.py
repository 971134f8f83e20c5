"""Step 7 of the domain-shift study: statistics and report from ``cases.csv`` / ``cells.csv``, the
terminal headline, and the tables and report on the MLflow parent run.

Without ``--budgets``: one report (``dualssl.report.write_report``) with paired differences to
``--reference``. With ``--budgets``: one report per budget under ``report/budget-B/`` and the
budget axis in ``report/`` (``dualssl.report.budgets.write_budget_reports``). Both state each arm's
budget and wall time ("Budget and wall time per arm", from ``cells.csv``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

PHANTOM_NOTE = " (the procedural phantom: a test fixture, not evidence about real hospitals)"


def report_meta(plan: Any, data_root: str, phantom: bool, cells: list[dict[str, Any]],
                failed: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The report's header facts."""
    done = len(cells) - len(failed)
    meta: dict[str, Any] = {
        "data": data_root + (PHANTOM_NOTE if phantom else ""), "source sites": plan.source_sites,
        "arms": list(plan.arms), "reference": plan.reference, "seeds": plan.seeds,
        "cells": f"{done} of {len(cells)} finished" + (
            f" (did not finish: {', '.join(c['cell'] for c in failed)})" if failed else "")}
    if plan.budgets:
        meta["budgets"] = [f"{b} iterations" for b in plan.budgets]
    else:
        meta["epochs"] = plan.cfg.optim.epochs
    meta.update({"selection": "best epoch on source validation (no unseen-site data)",
                 "unseen cases": "every case of each unseen site (selection and report parts)",
                 "wall_time_s": round(time.time() - started)})
    return meta


def write_study_report(plan: Any, cases_csv: Path, cases: list[dict[str, Any]], cells: list[dict[str, Any]],
                       *, n_boot: int, phantom: bool, data_root: str, data_pass: Any,
                       started: float) -> dict[str, Any]:
    """Write ``report/`` and return ``{"paths": write_report's paths (None without cases), "report": its
    paths as text, "budget_reports": {B: html}, "headline": terminal lines}``."""
    from dualssl.report import write_report
    from dualssl.report.budgets import write_budget_reports
    from dualssl.report.study_sections import budget_section
    from dualssl.stats import read_cases
    from studies.preprocess import fingerprint_sections
    from studies.shift_console import budget_headline, report_headline

    out: dict[str, Any] = {"paths": None}
    if not cases:
        return out
    failed = [c for c in cells if c["status"] != "completed"]
    meta = report_meta(plan, data_root, phantom, cells, failed, started)
    title = f"Domain shift: {plan.experiment}"
    folder = plan.study_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    study_wide = fingerprint_sections(data_pass, folder) + peer_sections(plan, cells)
    if plan.budgets:
        paths = write_budget_reports(read_cases(cases_csv), folder, title, meta, plan.budgets,
                                     reference=plan.reference, cells=cells, arms_info=plan.arm_rows,
                                     failed_cells=failed, n_boot=n_boot, extra_sections=study_wide)
        per_budget = paths.pop("budgets")
        out["budget_reports"] = {b: str(p["html"]) for b, p in per_budget.items()}
        out["headline"] = budget_headline(per_budget, cases, phantom, plan.reference)
    else:
        section = budget_section(cells)
        paths = write_report(read_cases(cases_csv), folder, title, meta, n_boot=n_boot, reference=plan.reference,
                             arms_info=plan.arm_rows, failed_cells=failed, total_cells=len(cells),
                             extra_sections=([section] if section else []) + study_wide)
        if "pooled_csv" in paths:
            out["headline"] = report_headline({k: str(v) for k, v in paths.items()}, cases, phantom, plan.reference)
    out["paths"] = paths
    out["report"] = {k: str(v) for k, v in paths.items()}
    return out


def peer_sections(plan: Any, cells: list[dict[str, Any]]) -> list[Any]:
    """Why a peer (nnU-Net) arm fails on a site: its fitted CT normalisation against each site's pancreas
    intensities (``studies/peer_report.py``); none without a finished peer cell."""
    from studies.peer_report import peer_intensity_sections

    peers = [arm for arm, recipe in plan.arms.items() if recipe.get("study.peer")]
    if not peers:
        return []
    return peer_intensity_sections(f"{plan.storage}/{plan.experiment}/train_runs", cells, peers,
                                   plan.study_dir / "fingerprint" / "fingerprint.json", plan.cfg.data.hu_window)


def log_parent(tracking_uri: str, parent: str, study_dir: Path, paths: dict[str, Path] | None,
               failed: list[dict[str, Any]], total: int) -> None:
    """The study's tables and report on the MLflow parent run, and which cells did not finish (tags
    ``cells_failed`` / ``failed_cells``, the latter naming them; ``cells.csv`` holds their errors)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    client.set_tag(parent, "cells_failed", f"{len(failed)} of {total}")
    client.set_tag(parent, "failed_cells", ", ".join(c["cell"] for c in failed)[:4000] or "none")
    for name in ("cases.csv", "cells.csv"):
        if (study_dir / name).is_file():
            client.log_artifact(parent, str(study_dir / name))
    if paths is not None:
        client.log_artifacts(parent, str(paths["markdown"].parent), artifact_path="report")
