"""Paired differences of each arm against a reference arm on the same (seed, site, case) rows.

Pairs are matched on (seed, source_site, site, case_id, axis, severity): the same trained seed, split
and patient under both arms, so case difficulty cancels. By default every row of a compared arm must
have its reference partner and vice versa (anything unmatched is an error naming the rows);
``on_unmatched="drop"`` keeps only the complete pairs (a failed cell removes its seed from that arm's
comparison) and counts the rows left out (``n_unmatched``).

Per group, on the differences d = arm - reference:

* ``mean_diff`` and its CI, ``p_value``, ``df``: the crossed patients x seeds analysis of
  ``crossed.crossed_mean`` (``method="crossed"``, default). A difference carries a seed part (each arm
  trains its own model per seed: ``b_arm[seed] - b_ref[seed]``, common to every patient of that seed)
  and a patient part (arm x patient interaction, common to every seed), plus noise; the t-test uses
  Satterthwaite degrees of freedom, which with few seeds are few (about ``seeds - 1`` when the seed part
  dominates).
* ``p_holm``: Holm's adjustment over every group this call returns (the arms x sites of one table).
* ``effect_size``: d_z = mean_diff / SD (ddof 1) of the per-patient differences, each patient's
  difference first averaged over its seeds (so seed noise is mostly averaged out of the SD).
* ``p_wilcoxon``: the Wilcoxon signed-rank p-value on all (seed, case) differences, which treats them
  as independent and so IGNORES SEEDS (its false-positive rate is far above alpha when seeds vary);
  kept for comparison only, never the headline.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from dualssl.stats.bootstrap import DEFAULT_N_BOOT
from dualssl.stats.cases import SWEEP_KEYS, Row, as_rows, group_by, unseen_rows
from dualssl.stats.crossed import holm
from dualssl.stats.summary import SITE_KEYS, _check_by, group_key, interval_fields, interval_of

UNMATCHED: tuple[str, ...] = ("raise", "drop")

PAIR_KEYS: tuple[str, ...] = ("seed", "source_site", "site", "case_id", "axis", "severity")
REFERENCE = "plain"


def _index(rows: Sequence[Row], arm: str) -> dict[tuple, Row]:
    index: dict[tuple, Row] = {}
    for r in rows:
        key = tuple(r[k] for k in PAIR_KEYS)
        if key in index:
            raise ValueError(f"arm {arm!r}: two rows for {dict(zip(PAIR_KEYS, key))}; "
                             f"each (seed, source_site, site, case_id) may appear once per arm")
        index[key] = r
    return index


def _describe_unmatched(keys: Sequence[tuple], limit: int = 5) -> str:
    shown = "; ".join(", ".join(f"{k}={v}" for k, v in zip(PAIR_KEYS, key) if v is not None)
                      for key in sorted(keys, key=str)[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


def pair_rows(rows: Iterable[Mapping[str, Any]], metric: str = "dice",
              reference: str = REFERENCE, on_unmatched: str = "raise") -> list[Row]:
    """One row per matched pair: the pair keys, ``arm`` and ``diff = arm - reference`` of ``metric``.

    NaN differences (a NaN metric on either side) are kept as NaN; the statistics drop them.
    ``on_unmatched``: ``"raise"`` (an error naming the unmatched rows) or ``"drop"`` (complete pairs only).
    """
    return match_pairs(rows, metric, reference, on_unmatched)[0]


def match_pairs(rows: Iterable[Mapping[str, Any]], metric: str = "dice", reference: str = REFERENCE,
                on_unmatched: str = "raise") -> tuple[list[Row], list[Row]]:
    """``pair_rows`` plus the rows left without a partner (each with ``arm`` = the compared arm, also for
    a reference row missing its partner), for counting per group."""
    if on_unmatched not in UNMATCHED:
        raise ValueError(f"on_unmatched: {on_unmatched!r} is not one of {UNMATCHED}")
    rows = as_rows(rows)
    by_arm = group_by(rows, lambda r: r["arm"])
    if reference not in by_arm:
        raise ValueError(f"reference arm {reference!r} is not in the table (arms: {list(by_arm)}); "
                         f"pass reference= one of them")
    ref = _index(by_arm[reference], reference)
    out: list[Row] = []
    unmatched: list[Row] = []
    for arm, arm_rows in by_arm.items():
        if arm == reference:
            continue
        idx = _index(arm_rows, arm)
        only_arm = [k for k in idx if k not in ref]
        only_ref = [k for k in ref if k not in idx]
        if (only_arm or only_ref) and on_unmatched == "drop":
            unmatched += [idx[k] for k in only_arm] + [dict(ref[k], arm=arm) for k in only_ref]
        elif only_arm or only_ref:
            parts = []
            if only_arm:
                parts.append(f"{len(only_arm)} row(s) of {arm!r} without a {reference!r} partner: "
                             f"{_describe_unmatched(only_arm)}")
            if only_ref:
                parts.append(f"{len(only_ref)} row(s) of {reference!r} without an {arm!r} partner: "
                             f"{_describe_unmatched(only_ref)}")
            raise ValueError("unmatched rows for the paired comparison: " + " | ".join(parts)
                             + ". Evaluate both arms on the same seeds, sites and cases, or drop the rows.")
        for key, r in idx.items():
            partner = ref.get(key)
            if partner is None:
                continue
            pair = {k: r[k] for k in PAIR_KEYS}
            pair.update(arm=arm, role=r.get("role"), diff=float(r[metric]) - float(partner[metric]))
            out.append(pair)
    return out, unmatched


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (NaN dropped; NaN if none left)."""
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-zero differences: scipy divides 0 by 0
        warnings.simplefilter("ignore", UserWarning)     # small-n / ties notices
        return float(stats.wilcoxon(d).pvalue)


def paired_differences(rows: Iterable[Mapping[str, Any]], *, reference: str = REFERENCE,
                       by: Sequence[str] = SITE_KEYS, metric: str = "dice", n_boot: int = DEFAULT_N_BOOT,
                       ci: float = 0.95, seed: int = 0, method: str = "crossed",
                       on_unmatched: str = "raise") -> list[dict[str, Any]]:
    """Per (arm, *by, axis, severity), arm != reference: n_pairs, n_seeds, n_cases, n_unmatched,
    mean_diff, ci_low, ci_high, excludes_zero, p_value (crossed t-test), p_holm, effect_size (d_z),
    p_wilcoxon (ignores seeds), the CI columns of ``summary.interval_fields`` (ci_method, df, se,
    se_patient, se_seed, seeds_for_balance, ci_note), reference and metric.

    ``by=("site",)`` pools source sites per test site; ``by=()`` pools everything given. ``p_holm``
    adjusts over all groups returned here. ``n_boot``/``seed`` only matter for ``method="bootstrap"``.
    """
    pairs, unmatched = match_pairs(rows, metric, reference, on_unmatched)
    if not pairs:
        raise ValueError(f"no pairs: only the reference arm {reference!r} is in the table, or no row of "
                         f"another arm has a {reference!r} partner; nothing to compare")
    by = _check_by(by, pairs)
    missing = group_by(unmatched, lambda r: group_key(r, by)) if unmatched else {}
    out = []
    for key, group in group_by(pairs, lambda r: group_key(r, by)).items():
        diffs = np.array([r["diff"] for r in group])
        interval = interval_of(group, "diff", method, n_boot=n_boot, ci=ci, seed=seed)
        out.append({**dict(zip(("arm", *by, *SWEEP_KEYS), key)), "reference": reference, "metric": metric,
                    "n_pairs": int((~np.isnan(diffs)).sum()), "n_seeds": len({r["seed"] for r in group}),
                    "n_cases": len({(r["site"], r["case_id"]) for r in group}),
                    "n_unmatched": len(missing.get(key, ())),
                    "mean_diff": interval.estimate, "ci_low": interval.low, "ci_high": interval.high,
                    "excludes_zero": interval.excludes_zero, "p_value": interval.p_value,
                    "effect_size": effect_size(group), "p_wilcoxon": wilcoxon_p(diffs),
                    **interval_fields(interval, method)})
    for row, adjusted in zip(out, holm([r["p_value"] for r in out])):
        row["p_holm"] = adjusted
    return out


def effect_size(pairs: Sequence[Row]) -> float:
    """d_z: mean difference / SD (ddof 1) of the per-patient differences averaged over seeds.

    A patient is (site, case_id). NaN with fewer than two patients or a zero SD (up to float rounding).
    """
    per_patient: dict[tuple, list[float]] = {}
    for r in pairs:
        if not math.isnan(r["diff"]):
            per_patient.setdefault((r["site"], r["case_id"]), []).append(r["diff"])
    if len(per_patient) < 2:
        return math.nan
    means = np.array([np.mean(v) for v in per_patient.values()])
    all_diffs = [d for v in per_patient.values() for d in v]
    sd = float(means.std(ddof=1))
    scale = float(np.abs(means).max())
    return float(np.mean(all_diffs)) / sd if sd > 1e-9 * max(scale, 1e-12) else math.nan   # float-noise SD = 0


def paired_unseen(rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    """The headline comparison: each arm - reference pooled over all unseen-site rows, one row per arm
    (``p_holm`` adjusts across the arms)."""
    unseen = unseen_rows(as_rows(rows))
    if not unseen:
        raise ValueError("no unseen-site rows (role == 'unseen', or site != source_site) to compare")
    return paired_differences(unseen, by=(), **kwargs)
