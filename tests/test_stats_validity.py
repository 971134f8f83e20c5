"""The report's statistics against a truth chosen here: simulated crossed studies with no true difference.

Each simulated study is what the domain-shift study produces (one source site, unseen test sites of
UNEQUAL size, every case scored by every arm and seed)::

    dice[arm, seed, site, case] = site_mean[site]                 (fixed; the truth pools them by size)
                                + patient[site, case]              shared by every seed and arm
                                + arm_x_patient[arm, site, case]   shared by the seeds of one arm
                                + seed_effect[arm, seed]           one trained model per arm and seed,
                                                                   shared by every site and case
                                + noise[arm, seed, site, case]

No arm has a true effect, so every paired difference has mean 0 and the mean of an arm over the unseen
sites is sum_site (cases of site / all cases) x site_mean. The studies go through the very functions
the report calls (``summarise_unseen``, ``paired_unseen``, ``paired_differences``), and the tests count
how often a nominal 95% interval covers the truth and how often p < 0.05.

Measured on the STUDIES = 1000 studies of ``run_studies`` (seed 2025):

====================================  =========================  ===============================
quantity                              before issue 25            crossed analysis (this code)
                                      (bootstrap, 1000 reps)
====================================  =========================  ===============================
headline 95% CI coverage (3 arms)     0.760                      0.956
pooled paired CI coverage (2 arms)    0.774                      0.957
per-site paired CI coverage (2 x 3)   0.804                      0.967
pooled paired p < .05 (no effect)     0.545 (Wilcoxon)           0.043 (crossed t)
per-site paired p < .05 (no effect)   0.352 (Wilcoxon)           0.033 (crossed t)
P(any Holm p < .05) in one table      --                         0.023
====================================  =========================  ===============================

so these tests fail on the old code (which also lacks ``p_value``/``p_holm``).

The cross-check at the end is independent of the simulation: a balanced table whose mean squares are
written out by hand (the textbook two-way random-effects ANOVA), compared with ``crossed_mean``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dualssl.stats import crossed_mean, holm, paired_differences, paired_unseen, summarise_unseen

STUDIES = 1000
ARMS = ("plain", "dual", "gin")
SEEDS = (0, 1, 2)
SITES = {"b": (9, 0.62), "c": (14, 0.74), "d": (6, 0.55)}    # unseen site: (cases, site mean)
SD = dict(patient=0.10, arm_x_patient=0.03, seed=0.03, noise=0.03)


def simulate(rng: np.random.Generator, sites=SITES, seeds=SEEDS, arms=ARMS, sd=SD) -> list[dict]:
    """One study's per-case rows (see the module docstring); source site ``a`` is not scored."""
    rows = []
    seed_effect = {(arm, s): rng.normal(0, sd["seed"]) for arm in arms for s in seeds}
    for site, (n, mean) in sites.items():
        patient = rng.normal(0, sd["patient"], n)
        inter = {arm: rng.normal(0, sd["arm_x_patient"], n) for arm in arms}
        for arm in arms:
            for s in seeds:
                noise = rng.normal(0, sd["noise"], n)
                values = mean + patient + inter[arm] + seed_effect[(arm, s)] + noise
                rows += [dict(arm=arm, seed=s, source_site="a", site=site, case_id=f"{site}{i}",
                              dice=float(v), role="unseen") for i, v in enumerate(values)]
    return rows


def truth(sites=SITES) -> float:
    n = sum(c for c, _ in sites.values())
    return sum(c * m for c, m in sites.values()) / n


def run_studies(n_studies: int, seed: int = 2025, **kwargs) -> dict[str, np.ndarray]:
    """Per study and compared arm (or arm x site): covered / rejected flags, as the report computes them."""
    rng = np.random.default_rng(seed)
    target = truth(kwargs.get("sites", SITES))
    out: dict[str, list] = {k: [] for k in ("head", "pair", "pair_p", "site", "site_p", "holm_any", "wilcoxon")}
    for _ in range(n_studies):
        rows = simulate(rng, **kwargs)
        for r in summarise_unseen(rows, n_boot=1):
            out["head"].append(r["ci_low"] <= target <= r["ci_high"])
        for d in paired_unseen(rows, n_boot=1):
            out["pair"].append(d["ci_low"] <= 0 <= d["ci_high"])
            out["pair_p"].append(d["p_value"] < 0.05)
            out["wilcoxon"].append(d["p_wilcoxon"] < 0.05)
        per_site = paired_differences(rows, by=("site",), n_boot=1)
        for d in per_site:
            out["site"].append(d["ci_low"] <= 0 <= d["ci_high"])
            out["site_p"].append(d["p_value"] < 0.05)
        out["holm_any"].append(any(d["p_holm"] < 0.05 for d in per_site))
    return {k: np.array(v, dtype=float) for k, v in out.items()}


@pytest.fixture(scope="module")
def crossed_studies():
    return run_studies(STUDIES)


@pytest.mark.parametrize("quantity", ["head", "pair", "site"])
def test_nominal_95_intervals_cover_the_truth(crossed_studies, quantity):
    coverage = crossed_studies[quantity].mean()
    assert 0.92 <= coverage <= 0.98, f"{quantity}: coverage {coverage:.3f} over {crossed_studies[quantity].size}"


@pytest.mark.parametrize("quantity", ["pair_p", "site_p"])
def test_false_positive_rate_holds_alpha(crossed_studies, quantity):
    rate = crossed_studies[quantity].mean()
    assert 0.03 <= rate <= 0.08, f"{quantity}: false-positive rate {rate:.3f} at alpha 0.05"


def test_holm_keeps_the_familywise_rate_of_one_table(crossed_studies):
    # 2 compared arms x 3 sites per table: Holm keeps P(any adjusted p < .05) at or below about alpha.
    assert crossed_studies["holm_any"].mean() <= 0.07


def test_wilcoxon_ignores_seeds_and_is_kept_only_as_such(crossed_studies):
    # The reason it is no longer the headline p: it treats (seed, case) pairs as independent.
    assert crossed_studies["wilcoxon"].mean() > 0.2


@pytest.mark.parametrize("scenario", [
    dict(seeds=(0, 1)),                                                             # the fewest seeds
    dict(sd=dict(patient=0.10, arm_x_patient=0.06, seed=0.005, noise=0.03)),       # patient part dominates
])
def test_other_designs_keep_the_level(scenario):
    got = run_studies(400, seed=31, **scenario)
    for quantity in ("head", "pair", "site"):
        assert 0.92 <= got[quantity].mean() <= 0.98, (quantity, got[quantity].mean())
    assert 0.02 <= got["pair_p"].mean() <= 0.08


def simulate_leave_one_out(rng: np.random.Generator, seeds=SEEDS) -> list[dict]:
    """Every site is a source once; its models score the other sites. Source sites shift the level (fixed),
    and a test case is the same patient under every source's models."""
    sites = {"a": (8, 0.70), "b": (12, 0.60), "c": (6, 0.65)}
    source_shift = {"a": 0.05, "b": -0.03, "c": 0.0}
    patient = {g: rng.normal(0, 0.10, n) for g, (n, _) in sites.items()}
    rows = []
    for arm in ("plain", "dual"):
        inter = {g: rng.normal(0, 0.03, n) for g, (n, _) in sites.items()}
        for src in sites:
            for s in seeds:
                model = rng.normal(0, 0.03)
                for g, (n, mean) in sites.items():
                    if g == src:
                        continue
                    values = mean + source_shift[src] + patient[g] + inter[g] + model + rng.normal(0, 0.03, n)
                    rows += [dict(arm=arm, seed=s, source_site=src, site=g, case_id=f"{g}{i}", dice=float(v),
                                  role="unseen") for i, v in enumerate(values)]
    target = (sum(n * (m + source_shift[src]) for src in sites for g, (n, m) in sites.items() if g != src)
              / sum(n for src in sites for g, (n, _) in sites.items() if g != src))
    return rows, target


def test_leave_one_site_out_keeps_the_level():
    """Several source sites: patients shared across sources, model units (source, seed), sources fixed."""
    rng = np.random.default_rng(5)
    head, pair = [], []
    for _ in range(250):
        rows, target = simulate_leave_one_out(rng)
        head += [r["ci_low"] <= target <= r["ci_high"] for r in summarise_unseen(rows)]
        pair += [d["ci_low"] <= 0 <= d["ci_high"] for d in paired_unseen(rows)]
    assert 0.92 <= np.mean(head) <= 0.99 and 0.92 <= np.mean(pair) <= 0.99


def test_a_failed_cell_and_missing_cases_keep_the_level():
    """One seed of one arm missing (a failed cell) and a few cases missing: complete pairs only, level kept."""
    rng = np.random.default_rng(11)
    n_cases = sum(n for n, _ in SITES.values())
    cover, reject = [], []
    for _ in range(300):
        rows = [r for r in simulate(rng) if not (r["arm"] == "dual" and r["seed"] == 2)]   # a failed cell
        lost = set(rng.choice(len(rows), 3, replace=False).tolist())
        rows = [r for i, r in enumerate(rows) if i not in lost]
        by_arm = {d["arm"]: d for d in paired_unseen(rows, n_boot=1, on_unmatched="drop")}
        d = by_arm["dual"]
        assert d["n_seeds"] == 2 and d["n_unmatched"] >= n_cases - 3   # plain's seed-2 rows lost their partner
        assert not math.isnan(d["ci_low"])
        cover.append(d["ci_low"] <= 0 <= d["ci_high"])
        reject.append(d["p_value"] < 0.05)
    assert 0.91 <= np.mean(cover) <= 0.99 and 0.01 <= np.mean(reject) <= 0.09


# ---------------------------------------------------------------- independent cross-check

# 4 patients x 3 seeds, one stratum; balanced. Numbers typed by hand.
TABLE = np.array([[0.70, 0.74, 0.69],
                  [0.55, 0.60, 0.52],
                  [0.81, 0.86, 0.80],
                  [0.62, 0.70, 0.61]])


def test_crossed_mean_equals_textbook_two_way_anova_on_a_hand_table():
    """Var(grand mean) = (MS_patient + MS_seed - MS_residual) / (N S), df by Satterthwaite, t interval.

    Expected mean squares of the balanced two-way random-effects layout (textbook, e.g. Searle, Casella
    & McCulloch, Variance Components, ch. 4), computed here with loops, not with the module's code."""
    y = TABLE
    n, s = y.shape
    grand = y.mean()
    ss_p = s * sum((y[i].mean() - grand) ** 2 for i in range(n))
    ss_s = n * sum((y[:, j].mean() - grand) ** 2 for j in range(s))
    ss_e = sum((y[i, j] - y[i].mean() - y[:, j].mean() + grand) ** 2 for i in range(n) for j in range(s))
    ms_p, ms_s, ms_e = ss_p / (n - 1), ss_s / (s - 1), ss_e / ((n - 1) * (s - 1))
    # E[MS_p] = se2 + S sa2, E[MS_s] = se2 + N sb2, E[MS_e] = se2; Var(mean) = sa2/N + sb2/S + se2/(NS).
    var = (ms_p + ms_s - ms_e) / (n * s)
    # Satterthwaite, with the seed term at its 70% upper bound for the df only (DF_GUARD_QUANTILE = 0.3).
    guard = (s - 1) / sps.chi2.ppf(0.3, s - 1)
    terms = [(ms_p / (n * s), n - 1), (guard * ms_s / (n * s), s - 1), (-ms_e / (n * s), (n - 1) * (s - 1))]
    df = sum(t for t, _ in terms) ** 2 / sum(t ** 2 / d for t, d in terms)
    half = sps.t.ppf(0.975, df) * math.sqrt(var)

    rows = [dict(seed=j, stratum="b", case_id=f"c{i}", value=float(y[i, j])) for i in range(n) for j in range(s)]
    got = crossed_mean(rows)
    assert got.estimate == pytest.approx(grand)
    assert got.se ** 2 == pytest.approx(var)
    assert got.df == pytest.approx(df)
    assert (got.low, got.high) == pytest.approx((grand - half, grand + half))
    assert got.p_value == pytest.approx(2 * sps.t.sf(grand / math.sqrt(var), df))
    # The split the seed recommendation uses: patient part sa2/N, seed part (sb2 + se2/N)/S.
    assert got.var_patient == pytest.approx((ms_p - ms_e) / (n * s))
    assert got.var_seed == pytest.approx(ms_s / (n * s))


def test_crossed_mean_degenerate_tables_give_nan_and_a_reason():
    one_seed = [dict(seed=0, stratum="b", case_id=f"c{i}", value=v) for i, v in enumerate([0.1, 0.5, 0.3])]
    got = crossed_mean(one_seed)
    assert got.estimate == pytest.approx(0.3) and math.isnan(got.low) and math.isnan(got.p_value)
    assert "one seed" in got.note
    one_case = [dict(seed=j, stratum="b", case_id="c0", value=v) for j, v in enumerate([0.1, 0.5, 0.3])]
    got = crossed_mean(one_case)
    assert math.isnan(got.high) and "one case" in got.note
    assert math.isnan(crossed_mean([]).estimate)


def test_holm_matches_the_step_down_written_out():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
