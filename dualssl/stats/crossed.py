"""A mean and its t interval when patients and trained models (seeds) are crossed random factors.

The design. Every case (patient) of a test site is scored by every trained model, and a model is one
(source site, seed) of one arm; so a value is ``y[p, u]`` for patient ``p`` and model unit ``u``. The
model assumed for one group of values (one arm, or the paired differences of two arms)::

    y[p, u] = m[g(p)] + a[p] + b[u] + e[p, u]

* ``g(p)``, the stratum of patient ``p`` (the test site): a FIXED effect. The estimand is the plain
  mean of the rows, i.e. the strata weighted by their share of rows (sites weighted by case count when
  every model scores every case), so a site with more cases counts more, exactly as the point estimate.
* ``a[p]``, patient: RANDOM, variance ``sa2[g]`` (may differ per stratum), shared by every model.
* ``b[u]``, model unit: RANDOM, variance ``sb2``, shared by every patient and every stratum the model
  scores (a seed's model is worse or better everywhere). Units are grouped in FIXED blocks (the source
  site: models of different source sites differ systematically, which is not seed noise).
* ``e[p, u]``: RANDOM, variance ``se2[g]``; it also absorbs any patient x model interaction.
  The random parts are independent with mean 0; the t interval further assumes them roughly normal.

Estimation (method of moments on the two-way layout, no iteration, no bootstrap). With ``w_g`` the
stratum's share of the rows, ``n_g`` its patients and ``S`` the model units::

    Var(mean) = sum_g w_g^2 sa2[g] / n_g  +  (sb2 + sum_g w_g^2 se2[g] / n_g) / S
                `----- patient part ----'    `---------- seed part ----------'

* seed part: the spread of the per-unit deviations ``d_u`` (each unit's additive least-squares effect
  within each stratum, averaged over strata with weights ``w_g``, centred within its block) --
  ``var(d_u, ddof=1) / S`` per block, blocks combined by their row shares; ``S - 1`` degrees of freedom.
* patient part: per stratum ``w_g^2 (s2_g - MS_E,g / U_g) / n_g``, where ``s2_g`` is the variance
  (ddof 1) of the patients' adjusted means over units (estimating ``sa2 + se2 / U``) and ``MS_E,g`` the
  residual mean square of the additive fit (estimating ``se2``); truncated at 0 per stratum. A stratum
  with one patient borrows the pooled patient and residual mean squares of the others.
* degrees of freedom: Satterthwaite over those mean-square terms (the negative residual term included),
  with the seed terms taken at a 70% upper bound for the df only (``DF_GUARD_QUANTILE``): plain
  Satterthwaite under-covers when the seed part has 1-2 df. The interval is ``mean +- t(df) * se`` and
  the p-value the two-sided t-test of ``mean = 0``.

For a balanced table with one block this is the textbook two-way random-effects ANOVA:
``Var(mean) = (MS_patient + MS_seed - MS_residual) / (N S)`` (tests/test_stats_validity.py checks it on a
hand-typed table). With missing cells (a failed cell removes a seed of one arm; a NaN value removes one
cell) the same formulas run on the additive least-squares fit: an approximation, close when the table is
nearly balanced. What few seeds cost: the seed part has only ``S - 1`` degrees of freedom, so with 3 seeds
and a dominant seed part the t quantile is about 4.3, not 1.96 -- the interval is wide because the data
cannot say more. ``seeds_for_balance`` is the seed count at which the seed part would fall to the
patient part (same variance components).

Degenerate tables give NaN intervals and a ``note``: one seed (seed variance not estimable), one case
(patient variance not estimable), no values. Zero estimated variance (e.g. identical arms) gives a
zero-width interval; its p-value is 1 when the mean is 0 and 0 otherwise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

NAN = float("nan")
DF_GUARD_QUANTILE = 0.3
"""Seed terms enter the Satterthwaite df at their 70% upper bound (``_satterthwaite``). Chosen on a
simulation separate from the tests' (seed 7, 400 studies per scenario): pooled paired-difference
coverage with 2 seeds 0.879 -> 0.936, with 3 seeds 0.922 -> 0.936; patient- and noise-dominated
scenarios stay within 0.93-0.98."""


@dataclass(frozen=True)
class CrossedInterval:
    """A mean, its crossed-design t interval and test of ``mean = 0``, and the variance split.

    ``var_patient`` + ``var_seed`` = ``se**2``; ``seeds_for_balance`` = smallest seed count (>= 2) at
    which the seed part would be no larger than the patient part, in seeds per block (source site)
    (None when the patient part is 0 or not computable).
    """

    estimate: float
    low: float
    high: float
    se: float
    df: float
    p_value: float
    var_patient: float
    var_seed: float
    n_seeds: int
    n_cases: int
    seeds_for_balance: int | None = None
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a zero-width interval at 0 does not)."""
        return bool(self.low > 0 or self.high < 0)


def _additive_fit(y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Least-squares ``y[p, u] = mu + a[p] + b[u]`` on the observed (non-NaN) cells of ``y`` (P x U).

    Returns (patient adjusted means over units (P,), unit effects centred to mean 0 (U,),
    residual sum of squares, residual df).
    """
    n_p, n_u = y.shape
    obs = ~np.isnan(y)
    if obs.all():                                        # balanced: closed form
        grand = y.mean()
        a = y.mean(axis=1)
        b = y.mean(axis=0) - grand
        resid = y - a[:, None] - b[None, :]
        return a, b, float((resid ** 2).sum()), (n_p - 1) * (n_u - 1)
    pi, ui = np.nonzero(obs)
    x = np.zeros((pi.size, n_p + n_u))
    x[np.arange(pi.size), pi] = 1.0
    x[np.arange(pi.size), n_p + ui] = 1.0
    coef, _, rank, _ = np.linalg.lstsq(x, y[obs], rcond=None)
    resid = y[obs] - x @ coef
    b = coef[n_p:] - coef[n_p:].mean()
    a = coef[:n_p] + coef[n_p:].mean()                   # patient mean over all units, as if balanced
    return a, b, float((resid ** 2).sum()), int(pi.size - rank)


def _nan_result(estimate: float, n_seeds: int, n_cases: int, note: str) -> CrossedInterval:
    return CrossedInterval(estimate, NAN, NAN, NAN, NAN, NAN, NAN, NAN, n_seeds, n_cases, None, note)


def crossed_mean(rows: Iterable[Mapping[str, Any]], ci: float = 0.95) -> CrossedInterval:
    """Plain mean of ``rows[i]["value"]`` and its crossed patients x seeds interval (module docstring).

    Args:
        rows: one per value, with ``value`` (float; NaN dropped), ``seed`` (the model unit),
            ``stratum`` (the patient's stratum, e.g. the test site), ``case_id`` (the patient, within its
            stratum) and optionally ``block`` (fixed group of model units, e.g. the source site).
        ci: two-sided coverage in (0, 1).

    Raises ``ValueError`` when one (stratum, case_id, seed) appears twice.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    cells: dict[Hashable, dict[Hashable, dict[Hashable, float]]] = defaultdict(lambda: defaultdict(dict))
    block_of: dict[Hashable, Hashable] = {}
    for r in rows:
        v = float(r["value"])
        if math.isnan(v):
            continue
        g, p, u = r["stratum"], r["case_id"], r["seed"]
        if u in cells[g][p]:
            raise ValueError(f"two values for case {p!r} of stratum {g!r} under seed {u!r}; "
                             f"each case may appear once per seed")
        cells[g][p][u] = v
        block_of[u] = r.get("block")
    values = [v for by_case in cells.values() for by_seed in by_case.values() for v in by_seed.values()]
    units = sorted(block_of, key=str)
    n_cases = sum(len(c) for c in cells.values())
    if not values:
        return _nan_result(NAN, 0, 0, "no values")
    estimate = float(np.mean(values))
    blocks: dict[Hashable, list] = defaultdict(list)
    for u in units:
        blocks[block_of[u]].append(u)
    if min(len(b) for b in blocks.values()) < 2:
        lone = [str(k) for k, b in blocks.items() if len(b) < 2 and k is not None]
        where = f" (source site {', '.join(lone)})" if lone else ""
        return _nan_result(estimate, len(units), n_cases,
                           f"one seed{where}: seed-to-seed variance cannot be estimated; run >= 2 seeds")
    if n_cases < 2 or all(len(c) < 2 for c in cells.values()):
        return _nan_result(estimate, len(units), n_cases,
                           "one case per stratum: patient variance cannot be estimated")

    total = len(values)
    uidx = {u: i for i, u in enumerate(units)}
    dev_sum = np.zeros(len(units))
    dev_w = np.zeros(len(units))
    per_stratum = []                               # (w_g, n_g, U_g, s2_g, MS_E,g, df_e,g)
    for g, by_case in cells.items():
        g_units = sorted({u for by_seed in by_case.values() for u in by_seed}, key=str)
        y = np.full((len(by_case), len(g_units)), np.nan)
        col = {u: j for j, u in enumerate(g_units)}
        for i, by_seed in enumerate(by_case.values()):
            for u, v in by_seed.items():
                y[i, col[u]] = v
        w = float((~np.isnan(y)).sum()) / total
        a, b, sse, df_e = _additive_fit(y)
        for u, j in col.items():
            dev_sum[uidx[u]] += w * b[j]
            dev_w[uidx[u]] += w
        s2 = float(np.var(a, ddof=1)) if a.size > 1 else NAN
        per_stratum.append((w, a.size, len(g_units), s2, sse / df_e if df_e > 0 else NAN, df_e))

    terms: list[tuple[float, float]] = []          # (signed variance term, its df) for Satterthwaite
    dev = dev_sum / dev_w
    var_seed = 0.0
    row_units = {u: 0 for u in units}
    for by_case in cells.values():
        for by_seed in by_case.values():
            for u in by_seed:
                row_units[u] += 1
    for members in blocks.values():
        d = dev[[uidx[u] for u in members]]
        share = sum(row_units[u] for u in members) / total
        term = share ** 2 * float(np.var(d, ddof=1)) / len(members)
        var_seed += term
        terms.append((term, len(members) - 1, True))

    ok = [s for s in per_stratum if s[1] >= 2]
    pooled_s2 = sum((n - 1) * s2 for _, n, _, s2, _, _ in ok) / sum(n - 1 for _, n, *_ in ok)
    pooled_df_p = sum(n - 1 for _, n, *_ in ok)
    with_e = [s for s in ok if s[5] > 0]
    pooled_df_e = sum(s[5] for s in with_e)
    pooled_mse = sum(s[4] * s[5] for s in with_e) / pooled_df_e if pooled_df_e else 0.0
    var_patient = 0.0
    for w, n, n_u, s2, mse, df_e in per_stratum:
        df_p = n - 1
        if n < 2:
            s2, df_p = pooled_s2, pooled_df_p
        if not df_e > 0:
            mse, df_e = pooled_mse, pooled_df_e
        p_term = w ** 2 * s2 / n
        e_term = w ** 2 * mse / (n_u * n) if df_e else 0.0
        if p_term - e_term > 0:
            var_patient += p_term - e_term
            terms.append((p_term, df_p, False))
            if e_term:
                terms.append((-e_term, df_e, False))
    var = var_seed + var_patient
    # Seeds at which the seed part (falls as 1/seeds) would equal the patient part; 2 at least (1 gives no CI).
    balance = max(2, math.ceil(len(units) / len(blocks) * var_seed / var_patient - 1e-9)) if var_patient > 0 else None
    if not var > 0:
        p = 1.0 if estimate == 0 else 0.0
        return CrossedInterval(estimate, estimate, estimate, 0.0, NAN, p, var_patient, var_seed, len(units),
                               n_cases, balance, "no variation between seeds or cases")
    df = _satterthwaite(terms)
    se = math.sqrt(var)
    half = float(special.stdtrit(df, (1 + ci) / 2)) * se   # t quantile
    p_value = float(2 * special.stdtr(df, -abs(estimate) / se))  # two-sided t
    return CrossedInterval(estimate, estimate - half, estimate + half, se, float(df), p_value, var_patient,
                           var_seed, len(units), n_cases, balance)


def _satterthwaite(terms: Sequence[tuple[float, float, bool]]) -> float:
    """Satterthwaite df of a sum of (signed variance term, its df, is a seed term), seed terms guarded.

    Plain Satterthwaite is liberal when a term has 1-2 df: its df estimate grows exactly in the studies
    whose seed variance came out small, so the t quantile shrinks when it should not. For the df only
    (never the SE), each seed term is taken at its one-sided upper confidence bound at level
    ``1 - DF_GUARD_QUANTILE`` (``term * df / chi2.ppf(DF_GUARD_QUANTILE, df)``), which pulls the df
    towards ``seeds - 1`` when the seed part is sizeable and leaves it alone when it is small.
    """
    guarded = [(t * (d / special.chdtri(d, 1 - DF_GUARD_QUANTILE) if seed else 1.0), d) for t, d, seed in terms]
    var = sum(t for t, _ in guarded)
    denom = sum(t ** 2 / d for t, d in guarded if d > 0)
    return var ** 2 / denom if denom > 0 else NAN


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order; NaN stays NaN and is not counted.

    Controls the family-wise error rate over the m non-NaN tests without assuming independence.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(v) for v in out]
