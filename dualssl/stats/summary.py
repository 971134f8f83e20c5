"""Per-group statistics of one metric: n, mean [CI], median, failure rate, std across seeds and cases.

A group is (arm, *by, axis, severity); ``axis``/``severity`` are None outside severity sweeps, so sweep
rows never mix with ordinary ones. The CI of a group's mean is, by default (``method="crossed"``), the
crossed patients x seeds t interval of ``crossed.crossed_mean``: a patient is (site, case_id), shared
by every seed and source site that scores it; a model unit is (source_site, seed); test sites are
fixed strata and source sites fixed blocks (see ``crossed_rows``). ``method="bootstrap"`` keeps the
older hierarchical percentile bootstrap (``bootstrap.hierarchical_bootstrap``), which resamples cases
independently inside each drawn seed and so is too narrow when seeds share patients (issue 25).

Standard deviations: across seeds = std of the per-seed means with ``ddof=1`` (NaN with one seed);
per case (the paper's stability) and across sites = sample std (``ddof=1``), as in
``dualssl.evaluation.metrics.summarise``; NaN where fewer than two values exist.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dualssl.stats.bootstrap import DEFAULT_N_BOOT, Interval, hierarchical_bootstrap
from dualssl.stats.cases import SWEEP_KEYS, Row, as_rows, group_by, unseen_rows
from dualssl.stats.crossed import CrossedInterval, crossed_mean

METHODS: tuple[str, ...] = ("crossed", "bootstrap")

SITE_KEYS: tuple[str, ...] = ("source_site", "site")
FAIL_BELOW = 0.5


def _check_by(by: Sequence[str], rows: Sequence[Row]) -> tuple[str, ...]:
    by = tuple(by)
    for col in by:
        if col in ("arm", *SWEEP_KEYS):
            raise ValueError(f"by: {col!r} is always part of the group; leave it out of by={by}")
        if col not in rows[0]:
            raise ValueError(f"by: the rows have no column {col!r}; choose from {sorted(rows[0])}")
    return by


def group_key(row: Row, by: Sequence[str]) -> tuple:
    """(arm, *by values, axis, severity) of one row."""
    return (row["arm"], *(row[c] for c in by), row["axis"], row["severity"])


def nest(rows: Iterable[Row], metric: str) -> dict[tuple, list[float]]:
    """``{(seed, (source_site, site)): [metric values]}`` for the bootstrap."""
    nested: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        nested[(r["seed"], (r["source_site"], r["site"]))].append(float(r[metric]))
    return nested


def crossed_rows(rows: Iterable[Row], metric: str) -> list[dict[str, Any]]:
    """Study rows -> ``crossed_mean`` rows: patient (site, case_id), model unit (source_site, seed),
    stratum = test site, block = source site."""
    return [{"value": float(r[metric]), "seed": (r["source_site"], r["seed"]), "block": r["source_site"],
             "stratum": r["site"], "case_id": r["case_id"]} for r in rows]


def interval_of(rows: Sequence[Row], metric: str, method: str, *, n_boot: int, ci: float,
                seed: int) -> CrossedInterval:
    """The group's mean and CI by ``method`` (a bootstrap result carries NaN df/p and its method note)."""
    if method == "crossed":
        return crossed_mean(crossed_rows(rows, metric), ci=ci)
    if method != "bootstrap":
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    b: Interval = hierarchical_bootstrap(nest(rows, metric), n_boot=n_boot, ci=ci, seed=seed)
    nan = float("nan")
    return CrossedInterval(b.estimate, b.low, b.high, nan, nan, nan, nan, nan, len({r["seed"] for r in rows}),
                           len({(r["site"], r["case_id"]) for r in rows}), None,
                           "hierarchical percentile bootstrap (too narrow when seeds share patients)")


def interval_fields(iv: CrossedInterval, method: str) -> dict[str, Any]:
    """The CI columns of a statistics row beside mean/ci_low/ci_high: method, df, se and its split."""
    return {"ci_method": method, "df": iv.df, "se": iv.se,
            "se_patient": float(np.sqrt(iv.var_patient)) if iv.var_patient == iv.var_patient else iv.var_patient,
            "se_seed": float(np.sqrt(iv.var_seed)) if iv.var_seed == iv.var_seed else iv.var_seed,
            "seeds_for_balance": iv.seeds_for_balance, "ci_note": iv.note}


def describe(rows: Sequence[Row], metric: str = "dice", *, fail_below: float = FAIL_BELOW,
             n_boot: int = DEFAULT_N_BOOT, ci: float = 0.95, seed: int = 0,
             method: str = "crossed") -> dict[str, Any]:
    """Statistics of ``metric`` over one group of rows (all seeds, sites and cases in it).

    Returns n_rows, n_cases (distinct source_site/site/case_id), n_seeds, n_nan, mean, ci_low, ci_high,
    median, fail_rate (fraction of values below ``fail_below``), seed_std, case_std, worst_site,
    worst_site_mean, site_std (over the (source_site, site) strata of the group), role, and the CI's
    ci_method, df (Satterthwaite), se, se_patient, se_seed (the two parts of se: sqrt of each variance
    part), seeds_for_balance (seeds at which the seed part would equal the patient part) and ci_note
    (why an interval is NaN). ``n_boot`` and ``seed`` only matter for ``method="bootstrap"``.
    """
    values = np.array([float(r[metric]) for r in rows])
    ok = ~np.isnan(values)
    v = values[ok]
    interval = interval_of(rows, metric, method, n_boot=n_boot, ci=ci, seed=seed)
    per_seed = [np.nanmean(np.array([float(r[metric]) for r in g]))
                for g in group_by(rows, lambda r: r["seed"]).values()]
    per_seed = [m for m in per_seed if not np.isnan(m)]
    strata = {k: np.array([float(r[metric]) for r in g])
              for k, g in group_by(rows, lambda r: (r["source_site"], r["site"])).items()}
    site_means = {k: float(np.nanmean(a)) for k, a in strata.items() if np.any(~np.isnan(a))}
    worst = min(site_means, key=site_means.get) if site_means else None
    roles = {r.get("role") for r in rows}
    return {
        "n_rows": len(rows),
        "n_cases": len({(r["source_site"], r["site"], r["case_id"]) for r in rows}),
        "n_seeds": len({r["seed"] for r in rows}),
        "n_nan": int((~ok).sum()),
        "mean": interval.estimate,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "median": float(np.median(v)) if v.size else float("nan"),
        "fail_rate": float((v < fail_below).mean()) if v.size else float("nan"),
        "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
        "case_std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
        "worst_site": None if worst is None else worst[1],
        "worst_site_mean": float("nan") if worst is None else site_means[worst],
        "site_std": float(np.std(list(site_means.values()), ddof=1)) if len(site_means) > 1 else float("nan"),
        "role": roles.pop() if len(roles) == 1 else "mixed",
        **interval_fields(interval, method),
    }


def summarise(rows: Iterable[Mapping[str, Any]], *, by: Sequence[str] = SITE_KEYS, metric: str = "dice",
              fail_below: float = FAIL_BELOW, n_boot: int = DEFAULT_N_BOOT, ci: float = 0.95,
              seed: int = 0, method: str = "crossed") -> list[dict[str, Any]]:
    """One statistics row per (arm, *by, axis, severity): the group's keys plus ``describe``'s fields.

    ``by=("source_site", "site")`` (default) is the arm x site table; ``by=()`` pools each arm over
    every row given (pass ``unseen_rows(rows)`` for the headline, or sweep rows for robustness curves).
    """
    rows = as_rows(rows)
    by = _check_by(by, rows)
    if metric not in rows[0]:
        raise ValueError(f"metric: the rows have no column {metric!r}")
    out = []
    for key, group in group_by(rows, lambda r: group_key(r, by)).items():
        keys = dict(zip(("arm", *by, *SWEEP_KEYS), key))
        out.append({**keys, "metric": metric,
                    **describe(group, metric, fail_below=fail_below, n_boot=n_boot, ci=ci, seed=seed,
                                  method=method)})
    return out


def summarise_unseen(rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    """The headline: each arm pooled over all unseen-site rows (no sweeps), one row per arm."""
    unseen = unseen_rows(as_rows(rows))
    if not unseen:
        raise ValueError("no unseen-site rows (role == 'unseen', or site != source_site) to pool")
    return summarise(unseen, by=(), **kwargs)
