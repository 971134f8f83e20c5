"""Paired differences of each arm against a reference arm on the same (seed, site, case) rows.

Pairs are matched on (seed, source_site, site, case_id, axis, severity): the same trained seed, split
and patient under both arms, so case difficulty cancels. Every row of a compared arm must have its
reference partner and vice versa; anything unmatched is an error naming the rows.

Per group: the mean of the differences (arm - reference), its hierarchical bootstrap CI (seeds, then
cases within site; ``bootstrap``), whether the CI excludes 0, and the Wilcoxon signed-rank p-value
(``scipy.stats.wilcoxon`` with its defaults: zeros dropped, exact distribution for small n). The
Wilcoxon test treats the pairs as independent, which they are not across seeds; read it next to the
CI, which does respect the nesting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from dualssl.stats.bootstrap import DEFAULT_N_BOOT, hierarchical_bootstrap
from dualssl.stats.cases import SWEEP_KEYS, Row, as_rows, group_by, unseen_rows
from dualssl.stats.summary import SITE_KEYS, _check_by, group_key, nest

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
              reference: str = REFERENCE) -> list[Row]:
    """One row per matched pair: the pair keys, ``arm`` and ``diff = arm - reference`` of ``metric``.

    NaN differences (a NaN metric on either side) are kept as NaN; the statistics drop them.
    """
    rows = as_rows(rows)
    by_arm = group_by(rows, lambda r: r["arm"])
    if reference not in by_arm:
        raise ValueError(f"reference arm {reference!r} is not in the table (arms: {list(by_arm)}); "
                         f"pass reference= one of them")
    ref = _index(by_arm[reference], reference)
    out: list[Row] = []
    for arm, arm_rows in by_arm.items():
        if arm == reference:
            continue
        idx = _index(arm_rows, arm)
        only_arm = [k for k in idx if k not in ref]
        only_ref = [k for k in ref if k not in idx]
        if only_arm or only_ref:
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
            partner = ref[key]
            pair = {k: r[k] for k in PAIR_KEYS}
            pair.update(arm=arm, role=r.get("role"), diff=float(r[metric]) - float(partner[metric]))
            out.append(pair)
    return out


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
                       ci: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
    """Per (arm, *by, axis, severity), arm != reference: n_pairs, n_seeds, mean_diff, ci_low, ci_high,
    excludes_zero, p_wilcoxon (and reference, metric).

    ``by=("site",)`` pools source sites per test site; ``by=()`` pools everything given.
    """
    pairs = pair_rows(rows, metric, reference)
    if not pairs:
        raise ValueError(f"only the reference arm {reference!r} is in the table; nothing to compare")
    by = _check_by(by, pairs)
    pairs_metric = "diff"
    out = []
    for key, group in group_by(pairs, lambda r: group_key(r, by)).items():
        diffs = np.array([r[pairs_metric] for r in group])
        interval = hierarchical_bootstrap(nest(group, pairs_metric), n_boot=n_boot, ci=ci, seed=seed)
        out.append({**dict(zip(("arm", *by, *SWEEP_KEYS), key)), "reference": reference, "metric": metric,
                    "n_pairs": int((~np.isnan(diffs)).sum()), "n_seeds": len({r["seed"] for r in group}),
                    "mean_diff": interval.estimate, "ci_low": interval.low, "ci_high": interval.high,
                    "excludes_zero": interval.excludes_zero, "p_wilcoxon": wilcoxon_p(diffs)})
    return out


def paired_unseen(rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    """The headline comparison: each arm - reference pooled over all unseen-site rows, one row per arm."""
    unseen = unseen_rows(as_rows(rows))
    if not unseen:
        raise ValueError("no unseen-site rows (role == 'unseen', or site != source_site) to compare")
    return paired_differences(unseen, by=(), **kwargs)
