"""The end of a multi-objective study: the Pareto front of the completed trials, a plot, and the
point of the front that is exported.

The front is over the study's objectives (``studies.objectives``: source validation only). The
plot shows objective 1 against objective 2 with the front highlighted and each trial coloured by
its mean Dice on the unseen sites, labelled "not used for selection": it is there to look at,
never to choose by.

Export rule (:func:`choose_from_front`): among the front's trials whose ``val_dice`` lies within
:data:`DICE_TOLERANCE` of the front's best, the one with the lowest ``val_stability`` (ties: the
higher Dice, then the trial id); ``--export-trial ID`` overrides it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from dualssl.stats import pareto_front
from studies.objectives import OBJECTIVES, objective_values

DICE_TOLERANCE = 0.01
PARETO_JSON = "pareto.json"
PARETO_PNG = "pareto.png"


def front_rows(rows: list[dict[str, Any]], names: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(points, front)``: every completed trial with its objective values, and those on the front.

    Each point is ``{"trial_id", names..., "mean_unseen_dice", "on_front"}``; trials with a missing
    (NaN) objective are points but never on the front."""
    points = []
    for r in rows:
        if r.get("status") != "completed":
            continue
        values = objective_values(r.get("metrics", {}), names)
        points.append({"trial_id": r["trial_id"], **values,
                       "mean_unseen_dice": float(r.get("metrics", {}).get("mean_unseen_dice", math.nan))})
    on = set(pareto_front([[p[n] for n in names] for p in points], [OBJECTIVES[n].mode for n in names]))
    for i, p in enumerate(points):
        p["on_front"] = i in on
    return points, [p for p in points if p["on_front"]]


def choose_from_front(front: list[dict[str, Any]], tolerance: float = DICE_TOLERANCE) -> dict[str, Any] | None:
    """The exported point: best ``val_dice`` within ``tolerance`` of the top, then lowest ``val_stability``."""
    if not front:
        return None
    if "val_dice" not in front[0] or "val_stability" not in front[0]:
        first = next(n for n in front[0] if n in OBJECTIVES)
        sign = 1 if OBJECTIVES[first].mode == "max" else -1
        return max(front, key=lambda p: sign * p[first])
    top = max(p["val_dice"] for p in front)
    near = [p for p in front if p["val_dice"] >= top - tolerance]
    return min(near, key=lambda p: (p["val_stability"], -p["val_dice"], p["trial_id"]))


def plot_front(points: list[dict[str, Any]], names: list[str], path: Path) -> Path:
    """Objective 1 vs 2, the front joined and ringed, colour = unseen-site Dice (not used for selection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = names[0], names[1]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    colours = [p["mean_unseen_dice"] for p in points]
    finite = [c for c in colours if math.isfinite(c)]
    scatter = ax.scatter([p[x_name] for p in points], [p[y_name] for p in points], c=colours, cmap="viridis",
                         vmin=min(finite) if finite else 0, vmax=max(finite) if finite else 1, s=45, zorder=3)
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p[x_name])
    ax.plot([p[x_name] for p in front], [p[y_name] for p in front], "-", color="tab:red", lw=1, zorder=2,
            label="Pareto front")
    ax.scatter([p[x_name] for p in front], [p[y_name] for p in front], s=140, facecolors="none",
               edgecolors="tab:red", lw=1.5, zorder=4)
    for p in points:
        ax.annotate(p["trial_id"][-5:], (p[x_name], p[y_name]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"{x_name}: {OBJECTIVES[x_name].label} ({OBJECTIVES[x_name].mode})")
    ax.set_ylabel(f"{y_name}: {OBJECTIVES[y_name].label} ({OBJECTIVES[y_name].mode})")
    fig.colorbar(scatter, ax=ax).set_label("mean unseen-site Dice (not used for selection)")
    ax.set_title("Trials on source validation; front in red")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_front(study_dir: Path, rows: list[dict[str, Any]], names: list[str],
                export_trial: str | None = None) -> dict[str, Any]:
    """``pareto.json``, ``pareto.csv`` and ``pareto.png`` in the study folder; returns the JSON content
    (``points``, ``front``, ``chosen`` trial id, ``rule``)."""
    points, front = front_rows(rows, names)
    chosen = choose_from_front(front)
    out = {"objectives": {n: OBJECTIVES[n].mode for n in names}, "points": points,
           "front": [p["trial_id"] for p in front], "chosen": export_trial or (chosen or {}).get("trial_id"),
           "rule": (f"--export-trial {export_trial}" if export_trial else
                    f"best val_dice within {DICE_TOLERANCE} of the front's top, then lowest val_stability"),
           "colour": "mean_unseen_dice: not used for selection"}
    clean = json.loads(json.dumps(out, default=str).replace("NaN", "null"))
    (study_dir / PARETO_JSON).write_text(json.dumps(clean, indent=1))
    with open(study_dir / "pareto.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["trial_id", *names, "mean_unseen_dice", "on_front"])
        writer.writeheader()
        writer.writerows(points)
    if len(names) >= 2 and points:
        plot_front(points, names, study_dir / PARETO_PNG)
    return out


def format_front(front_info: dict[str, Any]) -> str:
    """The front as text for the final report."""
    names = list(front_info["objectives"])
    lines = ["Pareto front (source validation; unseen Dice shown, not used for selection):",
             f"{'trial':>12s} " + " ".join(f"{n:>14s}" for n in names) + f" {'unseen Dice':>12s}"]
    for p in front_info["points"]:
        if p["on_front"]:
            mark = "  <- exported" if p["trial_id"] == front_info["chosen"] else ""
            lines.append(f"{p['trial_id']:>12s} " + " ".join(f"{p[n]:14.4f}" for n in names)
                         + f" {p['mean_unseen_dice']:12.4f}{mark}")
    lines.append(f"export rule: {front_info['rule']}")
    return "\n".join(lines)
