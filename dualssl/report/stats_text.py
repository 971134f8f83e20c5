"""The report's statistics in words: how intervals and p-values were computed, and a seed-count advice.

Everything here reads statistics rows of ``dualssl.stats`` (``summarise``, ``paired_differences``); the
numbers are formatted, never recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

METHODS_NOTE = (
    "Means pool every (seed, case) row, so a site weighs by its number of cases. "
    "**What is modelled.** Every case (patient) is scored by every trained model, so patients and models "
    "are crossed random factors: value = site level (fixed) + patient (random, shared by every seed, source "
    "site and arm) + model (random: one per arm, source site and seed, shared by every case and site) + "
    "noise. Source sites are fixed blocks of models. The 95% CIs are t intervals from the variance "
    "components of that two-way layout (method of moments on the additive fit, the textbook two-way "
    "random-effects ANOVA when the table is balanced); nothing is resampled. Their degrees of freedom "
    "(df, Satterthwaite, the seed part taken at a 70% upper bound for the df only) are small when the seed "
    "part dominates: about seeds - 1, so with {n_seeds} seed(s) the t quantile is {t_note}. "
    "**Paired differences** are matched on (seed, source site, site, case): a pair is one patient under two "
    "arms with the same seed; a difference keeps a seed part (each arm trains its own model per seed) and "
    "a patient part (arm x patient interaction). p = two-sided t-test of mean difference = 0 with those df; "
    "p (Holm) adjusts over the arms x sites of one table (the headline table: over its arms). "
    "d_z = mean difference / SD of the per-patient differences (each patient's difference averaged over "
    "its seeds, ddof 1). Pairs where one arm has no row (a failed cell) are left out and counted. "
    "A Wilcoxon signed-rank p on all (seed, case) pairs is in paired_differences.csv (p_wilcoxon) only for "
    "comparison: it treats the pairs as independent, IGNORES SEEDS, and rejects far too often when seeds "
    "vary. Checked against a known truth (tests/test_stats_validity.py: simulated crossed studies with no "
    "true difference): 95% intervals cover 0.94-0.96, p < 0.05 in 4-6% of studies. "
    "Failure = {metric} < {fail}. Seed std = std of the per-seed means (ddof 1); case std = std over cases "
    "(ddof 1), the stability measure. se_patient / se_seed in the CSVs are the two parts of the SE.")


def t_note(n_seeds: int) -> str:
    """The 97.5% t quantile at ``n_seeds - 1`` df in words (the worst case: all variance from seeds)."""
    if n_seeds < 2:
        return "undefined (one seed: no interval)"
    from scipy import special
    return f"up to {float(special.stdtrit(n_seeds - 1, 0.975)):.2f} (1.96 with many seeds)"


def methods_note(n_seeds: int, metric: str, fail: float) -> str:
    """``METHODS_NOTE`` filled in for a study with ``n_seeds`` seeds."""
    return METHODS_NOTE.format(n_seeds=n_seeds, t_note=t_note(n_seeds), metric=metric, fail=fail)


def seed_advice(paired: Sequence[Mapping[str, Any]], pooled: Sequence[Mapping[str, Any]],
                reference: str) -> str:
    """Where the seed part of the SE exceeds the patient part: how many seeds would balance them.

    ``seeds_for_balance`` (``dualssl.stats.crossed``) is the seed count at which the seed variance
    part, which falls as 1/seeds, would equal the patient part. Empty text when no row is seed-dominated.
    """
    lines = []
    for r in [*paired, *pooled]:
        se_seed, se_pat, need = r.get("se_seed"), r.get("se_patient"), r.get("seeds_for_balance")
        if se_seed is None or se_pat is None or math.isnan(se_seed) or math.isnan(se_pat) or se_seed <= se_pat:
            continue
        what = f"{r['arm']} − {reference}" if "mean_diff" in r else f"mean of {r['arm']}"
        target = (f"about {need} seeds (per source site)" if need is not None
                  else "more seeds (the patient part is ~0)")
        lines.append(f"{what}: seed part of the SE {se_seed:.3g} > patient part "
                     f"{se_pat:.3g} with {r['n_seeds']} seeds; {target} would bring the seed part "
                     f"down to the patient part.")
    if not lines:
        return ""
    return ("The seed-to-seed variation dominates the uncertainty here, so more cases would narrow the "
            "intervals little; more seeds would: " + " ".join(lines))


def unmatched_note(paired: Sequence[Mapping[str, Any]], reference: str) -> str:
    """A sentence naming the pairs left out (one arm without a row: a failed cell or a missing case)."""
    lost = {r["arm"]: r["n_unmatched"] for r in paired if r.get("n_unmatched")}
    if not lost:
        return ""
    parts = ", ".join(f"{arm}: {n} row(s)" for arm, n in lost.items())
    return (f" Rows without a partner in the other arm were left out of the paired comparison "
            f"({parts}; rows of either arm vs {reference}).")


def interval_notes(*tables: Sequence[Mapping[str, Any]]) -> str:
    """The distinct reasons an interval is missing or degenerate (``ci_note``), as one sentence."""
    notes = list(dict.fromkeys(r["ci_note"] for t in tables for r in t if r.get("ci_note")))
    return (" Intervals: " + "; ".join(notes) + ".") if notes else ""
