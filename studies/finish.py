"""The end of a study: every trial measured across sites, the best one chosen, logged and exported.

Trials that ASHA stopped never reach their own cross-site evaluation (Tune ends their actor), so
the driver evaluates their best checkpoint here, from the Train run stored under the trial id,
and adds the numbers to the trial's MLflow run. The trial table (``trials.json``/``trials.csv``)
and ``study.json`` in the study folder are what ``export_best.py`` reads.

A multi-objective study (``--objectives val_dice,val_stability``) ends with its Pareto front
(``studies/pareto.py``) and exports the front's documented point, or ``--export-trial ID``; every
study ends with the parameter importance of its Optuna study (``studies/importance.py``). A study
continued with a larger ``--num-samples`` keeps the rows of its earlier trials in the table.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import ray
import ray.train

from studies.crosssite import evaluate_async, flat_metrics, is_cross_metric
from studies.trainable import FINAL_KEY, best_checkpoint, checkpoint_history, objective, split_config, write_artifacts
from studies.objectives import objective_values
from studies.tracking import log_study_summary, log_trial_outcome, trial_runs


STOPPED = "stopped early (ASHA)"


def write_manifest(study_dir: Path, manifest: dict[str, Any]) -> None:
    (Path(study_dir) / "study.json").write_text(json.dumps(manifest, indent=1, default=str))


def _storage_fs(uri: str):
    import pyarrow.fs

    if "://" not in uri:
        return None
    return pyarrow.fs.FileSystem.from_uri(uri)[0]


def _cross(metrics: dict[str, Any]) -> dict[str, float]:
    """Cross-site numbers of a trial's result: reported (``site/...``, across-site keys) and ``oracle/...``."""
    return {k: float(v) for k, v in metrics.items()
            if is_cross_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _searched(config: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    names = manifest.get("searched") or [k for k in config if k.startswith("loss.")]
    return {k: config[k] for k in names if k in config}


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_"))


def launch_evaluations(grid) -> dict[str, Any]:
    """Start the cross-site evaluation of every trial that ASHA stopped, all at once (Ray tasks that
    run side by side as far as the cluster's CPUs allow): ``{trial_id: (train result, best
    checkpoint, its metrics, future, start time)}``, or ``{trial_id: exception}`` when its Train run
    holds no checkpoint."""
    import time

    pending: dict[str, Any] = {}
    for result in grid:
        if result.error is not None or (result.metrics or {}).get(FINAL_KEY):
            continue
        settings = split_config(result.config)[1]
        run_path = f"{settings.train_storage}/train_{_trial_id(result)}"
        try:
            train_result = ray.train.Result.from_path(run_path, storage_filesystem=_storage_fs(run_path))
            best, best_metrics = best_checkpoint(train_result)
        except (RuntimeError, FileNotFoundError) as exc:
            pending[_trial_id(result)] = exc
            continue
        future = evaluate_async(best, settings.cpus_per_worker, settings.gpus_per_worker)
        pending[_trial_id(result)] = (train_result, best, best_metrics, future, time.time())
    return pending


def trial_row(result, manifest: dict[str, Any], run_ids: dict[str, str],
              pending: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the trial table; a stopped trial's numbers come from its evaluation in
    ``pending`` (:func:`launch_evaluations`; launched here when not given)."""
    import time

    study_dir = Path(manifest["study_dir"])
    metrics = dict(result.metrics or {})
    trial_id = _trial_id(result)
    cfg, settings = split_config(result.config)
    selection_metric = cfg.eval.selection_metric
    folder = study_dir / "trials" / trial_id
    row: dict[str, Any] = {"trial_id": trial_id, "run_id": run_ids.get(trial_id),
                           "params": _searched(result.config, manifest), "config_hash": cfg.hash()}
    if result.error is not None:
        # An errored trial never competes: no objective, whatever it reported before failing.
        row.update(status="error", error=f"{type(result.error).__name__}: {result.error}"[:2000],
                   objective=float("nan"), metrics={}, epochs_done=int(metrics.get("epochs_done", 0)))
        if row["run_id"]:
            log_trial_outcome(manifest["tracking_uri"], row["run_id"], {}, None, 0, tags={"status": "error"})
        return row
    if metrics.get(FINAL_KEY):
        row["status"] = "completed"
        result.checkpoint.to_directory(str(folder))
        info = json.loads((folder / "trial.json").read_text())
        best_val = float(metrics[f"best_{selection_metric}"])
        best_epoch = int(metrics["best_epoch"])
        cross = _cross(metrics)
        if row["run_id"]:
            log_trial_outcome(manifest["tracking_uri"], row["run_id"], {}, folder, 0, tags={"status": "completed"})
    else:
        row["status"] = STOPPED
        run_path = f"{settings.train_storage}/train_{trial_id}"
        launched = (pending if pending is not None else launch_evaluations([result])).get(trial_id)
        if not isinstance(launched, tuple):
            row.update(status=f"error: {launched}", objective=float("nan"), metrics={})
            return row
        train_result, best, best_metrics, future, eval_started = launched
        outcome = ray.get(future)
        row["eval_wait_s"] = time.time() - eval_started  # from launch, so it includes queueing
        cross = flat_metrics(outcome["summary"])
        best_val = float(best_metrics.get(selection_metric, float("nan")))
        best_epoch = int(best_metrics.get("epoch", -1))
        info = {"trial_id": trial_id, "best_checkpoint": best.path, "train_run": run_path,
                "worst_site": outcome["summary"].get("across_sites", {}).get("worst_site"),
                "selection": settings.selection, "evaluated_by": "driver (trial stopped before its own evaluation)"}
        write_artifacts(folder, cfg, checkpoint_history(train_result.checkpoint), outcome["files"], info)
        if row["run_id"]:
            log_trial_outcome(manifest["tracking_uri"], row["run_id"],
                              {**cross, f"best_{selection_metric}": best_val, "best_epoch": best_epoch,
                               "objective": objective(settings.selection, best_val, cross)},
                              folder, int(metrics.get("epochs_done", 0)), tags={"status": row["status"]})
    row.update(best_checkpoint=info["best_checkpoint"], worst_site=info.get("worst_site"),
               best_epoch=best_epoch, epochs_done=int(metrics.get("epochs_done", 0)),
               objective=objective(settings.selection, best_val, cross),
               metrics={f"best_{selection_metric}": best_val, **cross}, artifacts=str(folder))
    return row


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest finite objective (ties: the first); None if there is none.

    Only trials that trained to the end compete, as in Optuna (stopped trials are PRUNED there,
    errored ones FAIL): ASHA judged a stopped trial worse at a rung, and an errored one may hold a
    partial score."""
    scored = [r for r in rows if r.get("status") == "completed" and isinstance(r.get("objective"), (int, float))
              and math.isfinite(r["objective"])]
    return max(scored, key=lambda r: r["objective"]) if scored else None


def write_table(study_dir: Path, rows: list[dict[str, Any]]) -> None:
    (study_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, dict)},
             **{f"param.{k}": v for k, v in r.get("params", {}).items()}, **r.get("metrics", {})} for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with open(study_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)


def format_report(rows: list[dict[str, Any]], best: dict[str, Any] | None, selection: str) -> str:
    lines = [f"{'trial':>12s} {'status':>22s} {'objective':>9s}  params"]
    for r in sorted(rows, key=lambda r: -r["objective"] if math.isfinite(r.get("objective", math.nan)) else 1):
        params = " ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in r["params"].items() if isinstance(v, float))
        lines.append(f"{r['trial_id']:>12s} {r['status'][:22]:>22s} {r.get('objective', math.nan):9.4f}  {params}")
    if best is None:
        return "\n".join(lines + ["no trial produced a score"])
    m = best["metrics"]
    sites = sorted({k.split("/")[1] for k in m if k.startswith("site/")})
    lines += ["", f"best trial {best['trial_id']} (selection: {selection}), epoch {best['best_epoch']}: "
                  f"source val Dice {next(v for k, v in m.items() if k.startswith('best_')):.4f}",
              f"{'site':>16s} {'part':>11s} {'n':>3s} {'Dice':>15s} {'HD95 mm':>15s} {'ASD mm':>15s} "
              f"{'missed':>6s} {'HD95 pen.':>9s}"]
    # source sites first (their validation cases), then the unseen sites (their report part)
    for site in sorted(sites, key=lambda s: (m.get(f"site/{s}/source") != 1, s)):
        g = lambda key: m.get(f"site/{site}/{key}", math.nan)  # noqa: E731
        part = "source val" if g("source") == 1 else "unseen"
        lines.append(f"{site:>16s} {part:>11s} {int(g('n')) if math.isfinite(g('n')) else 0:3d} "
                     f"{g('dice_mean'):7.4f}+-{g('dice_std'):6.4f} {g('hd95_mean'):7.2f}+-{g('hd95_std'):6.2f} "
                     f"{g('asd_mean'):7.2f}+-{g('asd_std'):6.2f} "
                     f"{int(g('n_missed')) if math.isfinite(g('n_missed')) else 0:6d} {g('hd95_penalised_mean'):9.2f}")
    lines.append("HD95/ASD: cases with both masks non-empty (a missed case is left out: see 'missed'); "
                 "HD95 pen.: a missed case counts as the diagonal of its image (mm)")
    lines.append(f"mean unseen Dice {m.get('mean_unseen_dice', math.nan):.4f}, worst site {best.get('worst_site')} "
                 f"{m.get('worst_site_dice', math.nan):.4f}, std across sites {m.get('std_across_sites', math.nan):.4f}, "
                 f"stability (std of per-case Dice) {m.get('stability', math.nan):.4f}")
    return "\n".join(lines)


def _previous_rows(study_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of earlier runs of a continued study (trials.json) that this run's grid does not hold."""
    path = study_dir / "trials.json"
    if not path.is_file():
        return []
    seen = {r["trial_id"] for r in rows}
    return [r for r in json.loads(path.read_text()) if r.get("trial_id") not in seen]


def _chosen_row(rows: list[dict[str, Any]], trial_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the row of ``trial_id``, None), or (None, a note) when it is not a completed trial."""
    row = next((r for r in rows if r["trial_id"] == trial_id), None)
    if row is None or row.get("status") != "completed" or not row.get("best_checkpoint"):
        have = ", ".join(r["trial_id"] for r in rows if r.get("status") == "completed") or "none"
        return None, (f"--export-trial {trial_id}: not a completed trial of this study (completed: {have}); "
                      "exported by the selection rule instead")
    return row, None


def export_row(study_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Export one given trial exactly as ``export_best.export_study`` exports its best one: that
    function runs on a copy of the manifest whose table holds this row only, writing into STUDY/model."""
    import tempfile

    from studies.export_best import export_study

    with tempfile.TemporaryDirectory(prefix="dualssl-export-") as tmp:
        (Path(tmp) / "study.json").write_text((study_dir / "study.json").read_text())
        (Path(tmp) / "trials.json").write_text(json.dumps([row], default=str))
        result = export_study(tmp, out=study_dir / "model")
    result["exported_by"] = "studies.finish.export_row (Pareto rule or --export-trial)"
    (study_dir / "export.json").write_text(json.dumps(result, indent=1))
    return result


def _search_outcome(study_dir: Path, manifest: dict[str, Any], rows: list[dict[str, Any]],
                    export_trial: str | None) -> tuple[dict[str, Any] | None, list[str], list[Path]]:
    """Pareto front (several objectives) and parameter importance: (front info, report lines, files)."""
    from studies.importance import format_importance, write_importance
    from studies.pareto import format_front, write_front

    names = manifest.get("objectives") or ["val_dice"]
    lines: list[str] = []
    files: list[Path] = []
    front = None
    if len(names) > 1:
        front = write_front(study_dir, rows, names, export_trial)
        lines.append(format_front(front))
        files += [study_dir / f for f in ("pareto.json", "pareto.csv", "pareto.png") if (study_dir / f).is_file()]
    if manifest.get("optuna_storage"):
        import optuna

        from studies.search_space import optuna_storage

        study = optuna.load_study(study_name=manifest["optuna_study"],
                                  storage=optuna_storage(manifest["optuna_storage"]))
        info = write_importance(study, names, study_dir)
        lines.append(format_importance(info))
        files += [Path(f) for f in info["files"]]
    return front, lines, files


def finish_study(grid, manifest: dict[str, Any], export: bool = True,
                 export_trial: str | None = None) -> dict[str, Any]:
    """Fill in every trial, rank them (or take the Pareto point), log the parent summary and export."""
    study_dir = Path(manifest["study_dir"])
    run_ids = trial_runs(manifest["tracking_uri"], manifest["parent_run_id"])
    pending = launch_evaluations(grid)
    rows = [trial_row(result, manifest, run_ids, pending) for result in grid]
    rows = _previous_rows(study_dir, rows) + rows
    names = manifest.get("objectives") or ["val_dice"]
    for r in rows:  # the objective values, as the searcher saw them, on the row and the trial's run
        if r.get("status") == "completed":
            r["objectives"] = objective_values(r["metrics"], names)
            if r.get("run_id"):
                log_trial_outcome(manifest["tracking_uri"], r["run_id"], r["objectives"], None, 0)
    write_table(study_dir, rows)
    front, extra_lines, files = _search_outcome(study_dir, manifest, rows, export_trial)
    best, note = None, None
    if export_trial:
        best, note = _chosen_row(rows, export_trial)
        if note and front is not None:
            from studies.pareto import write_front

            front = write_front(study_dir, rows, names)  # the rule's point, not the refused trial
    chosen = best["trial_id"] if best else (front or {}).get("chosen")
    if best is None:
        best = _chosen_row(rows, chosen)[0] if chosen else pick_best(rows)
    if note:
        extra_lines.append(note)
    log_study_summary(manifest["tracking_uri"], manifest["parent_run_id"], rows, best, study_dir, files)
    report = format_report(rows, best, manifest["selection"])
    summary: dict[str, Any] = {"rows": rows, "best_trial_id": best["trial_id"] if best else None,
                               "tracking_uri": manifest["tracking_uri"], "study_dir": str(study_dir),
                               "report": "\n\n".join([report, *extra_lines]), "front": front}
    if best is not None and export:
        if chosen:
            summary.update(export_row(study_dir, best))
        else:
            from studies.export_best import export_study

            summary.update(export_study(study_dir))
    return summary
