"""What a study optimises: named objectives computed from a trial's final result, source validation only.

* ``val_dice`` (max): the best epoch's source-validation ``eval.selection_metric`` (whole-volume
  Dice on the source validation cases); in a trial result it is ``objective`` (for ``--selection
  oracle`` that key holds the oracle Dice, which only a single-objective study may rank on).
* ``val_stability`` (min): instability on the source validation cases at the selected epoch, the
  sample standard deviation (ddof=1) of their per-case whole-volume Dice, measured by the trial's
  cross-site evaluation on the original grid (``site/<source>/dice_std``; with several source
  sites, the pooled standard deviation of all their cases, computed exactly from each site's
  ``n``, mean and std). No unseen (test) site enters it. It needs at least 2 source validation
  cases (otherwise it is NaN and the trial counts as failed for the search).

Both exist only in a trial's final result (after its cross-site evaluation); ``val_dice`` has an
early version in every epoch (``asha_score``), which is what ASHA cuts on when it is the first
objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from dualssl.config import ConfigError


@dataclass(frozen=True)
class Objective:
    """One objective: its name (also its key in results and MLflow), sense and meaning."""

    name: str
    mode: str  # "max" or "min"
    label: str


OBJECTIVES: dict[str, Objective] = {
    "val_dice": Objective("val_dice", "max", "source-val Dice (best epoch)"),
    "val_stability": Objective("val_stability", "min", "source-val instability (std of per-case Dice)"),
}
SINGLE_METRIC = "objective"
"""The result key a single-objective study optimises (today's ``objective``, oracle-aware)."""


def parse_objectives(text: str) -> list[str]:
    """``"val_dice,val_stability"`` -> names; ConfigError naming ``--objectives`` when unknown or repeated."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if not names or unknown:
        raise ConfigError(f"--objectives {text}: unknown {', '.join(unknown) or '(empty)'}; "
                          f"choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--objectives {text}: an objective is named twice")
    return names


def searcher_metrics(names: list[str]) -> tuple[str | list[str], str | list[str]]:
    """``(metric, mode)`` for ``OptunaSearch``: the single ``objective`` key, or lists for several."""
    if names == ["val_dice"]:
        return SINGLE_METRIC, "max"
    return list(names), [OBJECTIVES[n].mode for n in names]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def source_stability(metrics: Mapping[str, Any]) -> float:
    """Pooled sample std of per-case Dice over the source sites' validation cases (``site/<s>/source`` = 1)."""
    sites = sorted({k.split("/")[1] for k in metrics if k.startswith("site/") and k.endswith("/source")
                    and _num(metrics[k]) == 1.0})
    parts = [(_num(metrics.get(f"site/{s}/n")), _num(metrics.get(f"site/{s}/dice_mean")),
              _num(metrics.get(f"site/{s}/dice_std"))) for s in sites]
    parts = [(n, m, sd) for n, m, sd in parts if math.isfinite(n) and n >= 1 and math.isfinite(m)]
    total = sum(n for n, _, _ in parts)
    if total < 2:
        return math.nan
    grand = sum(n * m for n, m, _ in parts) / total
    within = 0.0
    for n, m, sd in parts:
        if n >= 2:
            if not math.isfinite(sd):
                return math.nan
            within += (n - 1) * sd * sd
    between = sum(n * (m - grand) ** 2 for n, m, _ in parts)
    return math.sqrt((within + between) / (total - 1))


def objective_values(result: Mapping[str, Any], names: list[str]) -> dict[str, float]:
    """``{name: value}`` of each objective from a final trial result or a trial row's metrics (NaN if absent)."""
    out: dict[str, float] = {}
    for name in names:
        if name == "val_dice":
            value = result.get("objective")  # a final result; a trial row's metrics hold best_<metric>
            if value is None:
                value = next((v for k, v in result.items() if k.startswith("best_")), math.nan)
            out[name] = _num(value)
        elif name == "val_stability":
            out[name] = source_stability(result)
    return out
