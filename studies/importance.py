"""What mattered: each searched parameter's importance for each objective, from the Optuna study.

``optuna.importance.get_param_importances`` with ``FanovaImportanceEvaluator`` (fANOVA: the share
of the objective's variance, under a random forest fitted to the trials, that each parameter
explains alone; seeded, normalised to sum 1 per objective; on the small studies here it ranks
better than PED-ANOVA, whose top-quantile split of a handful of trials is noise), over the COMPLETE trials of the study's Optuna storage (pruned and failed
trials have no final value). Written as ``importance.csv``/``importance.json`` and
``importance.png``, plus Optuna's slice plot (``slice_<objective>.png``: each parameter against the
objective), in the study folder. With fewer than :data:`MIN_TRIALS` completed trials there is
nothing to compare: a note, no table.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

MIN_TRIALS = 3
IMPORTANCE_JSON = "importance.json"


def _target(index: int, multi: bool):
    return (lambda t: t.values[index]) if multi else None


def param_importances(study, names: list[str]) -> dict[str, Any]:
    """``{"importances": {objective: {param: value}}, "n_trials": n, "note": str | None}``."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, Any] = {"importances": {}, "n_trials": len(complete), "note": None,
                           "evaluator": "FanovaImportanceEvaluator"}
    if len(complete) < MIN_TRIALS:
        out["note"] = (f"parameter importance skipped: {len(complete)} completed trial(s), it needs at least "
                       f"{MIN_TRIALS} (run more with a larger --num-samples; the study continues)")
        return out
    multi = len(study.directions) > 1
    params = sorted({p for t in complete for p in t.params})
    for i, name in enumerate(names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of the evaluator
            try:
                values = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0),
                                               target=_target(i, multi), normalize=True)
            except (ValueError, RuntimeError) as exc:
                out["note"] = f"parameter importance of {name} failed: {exc}"
                continue
        out["importances"][name] = {p: float(values.get(p, 0.0)) for p in params}
    return out


def plot_importances(info: dict[str, Any], path: Path) -> Path:
    """One horizontal bar chart per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(info["importances"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names):
        values = info["importances"][name]
        params = sorted(values, key=values.get)
        ax.barh(params, [values[p] for p in params], color="tab:blue")
        ax.set_title(f"{name} ({info['n_trials']} trials)")
        ax.set_xlabel("importance (fANOVA, sums to 1)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_slices(study, names: list[str], study_dir: Path) -> list[Path]:
    """Optuna's slice plot (matplotlib) of every searched parameter, one file per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_slice

    multi = len(study.directions) > 1
    paths = []
    for i, name in enumerate(names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = plot_slice(study, target=_target(i, multi), target_name=name)
        first = axes.flat[0] if hasattr(axes, "flat") else axes
        path = study_dir / f"slice_{name}.png"
        first.figure.set_size_inches(max(6.0, 3.2 * len(getattr(axes, "flat", [first]))), 3.4)
        first.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(first.figure)
        paths.append(path)
    return paths


def write_importance(study, names: list[str], study_dir: Path) -> dict[str, Any]:
    """Table (CSV, JSON) and plots in ``study_dir``; returns the JSON content plus ``files``."""
    info = param_importances(study, names)
    files: list[Path] = []
    if info["importances"]:
        with open(study_dir / "importance.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["parameter", *info["importances"]])
            params = sorted(next(iter(info["importances"].values())))
            for p in params:
                writer.writerow([p, *(f"{info['importances'][n][p]:.4f}" for n in info["importances"])])
        files += [study_dir / "importance.csv", plot_importances(info, study_dir / "importance.png")]
        try:
            files += plot_slices(study, names, study_dir)
        except (ValueError, RuntimeError, IndexError) as exc:
            info["note"] = f"slice plot skipped: {exc}"
    (study_dir / IMPORTANCE_JSON).write_text(json.dumps(info, indent=1))
    info["files"] = [str(f) for f in [study_dir / IMPORTANCE_JSON, *files]]
    return info


def format_importance(info: dict[str, Any]) -> str:
    """The table as text for the final report (or the note)."""
    if not info["importances"]:
        return info["note"] or "parameter importance: nothing to report"
    names = list(info["importances"])
    lines = [f"parameter importance ({info['evaluator']}, {info['n_trials']} completed trials):",
             f"{'parameter':>24s} " + " ".join(f"{n:>14s}" for n in names)]
    for p in sorted(info["importances"][names[0]], key=lambda p: -info["importances"][names[0]][p]):
        lines.append(f"{p:>24s} " + " ".join(f"{info['importances'][n][p]:14.3f}" for n in names))
    if info.get("note"):
        lines.append(info["note"])
    return "\n".join(lines)
