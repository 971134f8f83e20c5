"""dualssl.stats against independent computations on small tables with numbers chosen by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dualssl.stats import (crossed_mean, effect_size, hierarchical_bootstrap, pair_rows, paired_differences,
                           paired_unseen, pareto_front, read_cases, summarise, summarise_unseen, wilcoxon_p)

# Seed 0 and seed 1 of arm "plain", source site "a", tested on "b" (unseen) and "a" (source validation).
HAND = {
    (0, "b"): [0.9, 0.4, 0.8],
    (1, "b"): [0.7, 0.6, 1.0],
    (0, "a"): [0.95, 0.85, 0.9],
    (1, "a"): [0.8, 0.9, 0.7],
}


def hand_rows(arm: str = "plain", shift: float = 0.0) -> list[dict]:
    rows = []
    for (seed, site), values in HAND.items():
        for i, v in enumerate(values):
            rows.append(dict(arm=arm, seed=seed, source_site="a", site=site, case_id=f"{site}{i}",
                             dice=v + shift, role="source" if site == "a" else "unseen"))
    return rows


# ---------------------------------------------------------------- reading the table

def test_read_cases_parses_numbers_nan_and_sweep_columns(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("arm,seed,source_site,site,case_id,dice,hd95,role,axis,severity\n"
                    "plain,0,a,b,c1,0.8,3.5,unseen,,\n"
                    "plain,1,a,b,c1,0,,unseen,,\n"
                    "dual,0,a,sweep_noise,c1,0.7,NaN,unseen,noise,2\n")
    rows = read_cases(path)
    assert [r["seed"] for r in rows] == [0, 1, 0]
    assert rows[0]["dice"] == 0.8 and rows[0]["hd95"] == 3.5
    assert math.isnan(rows[1]["hd95"]) and math.isnan(rows[2]["hd95"])
    assert rows[0]["axis"] is None and rows[0]["severity"] is None
    assert rows[2]["axis"] == "noise" and rows[2]["severity"] == 2.0


def test_read_cases_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("arm,seed,source_site,site,dice\nplain,0,a,b,0.8\n")
    with pytest.raises(ValueError, match=r"cases\.csv.*case_id"):
        read_cases(path)
    path.write_text("arm,seed,source_site,site,case_id,dice\nplain,0,a,b,c1,0.8\nplain,0,a,b,c2,high\n")
    with pytest.raises(ValueError, match=r"cases\.csv, line 3: column 'dice' holds 'high'"):
        read_cases(path)
    path.write_text("arm,seed,source_site,site,case_id,dice\nplain,0,a,b,c1,\n")
    with pytest.raises(ValueError, match=r"line 2: 'dice' is empty.*write 0"):
        read_cases(path)
    path.write_text("arm,seed,source_site,site,case_id,dice,axis,severity\nplain,0,a,b,c1,0.5,noise,\n")
    with pytest.raises(ValueError, match=r"line 2: a sweep row needs both 'axis' and 'severity'"):
        read_cases(path)


# ---------------------------------------------------------------- per-group statistics

def test_summary_of_hand_table_matches_hand_computation():
    (b,) = [s for s in summarise(hand_rows(), n_boot=200) if s["site"] == "b"]
    values = [0.9, 0.4, 0.8, 0.7, 0.6, 1.0]
    mean = sum(values) / 6
    assert b["n_rows"] == 6 and b["n_cases"] == 3 and b["n_seeds"] == 2 and b["role"] == "unseen"
    assert b["mean"] == pytest.approx(4.4 / 6)
    assert b["median"] == pytest.approx(0.75)                       # (0.7 + 0.8) / 2
    assert b["fail_rate"] == pytest.approx(1 / 6)                   # only 0.4 < 0.5
    assert b["seed_std"] == pytest.approx(abs(2.1 / 3 - 2.3 / 3) / math.sqrt(2))   # ddof=1 of two means
    assert b["case_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 5))
    assert b["ci_low"] <= b["mean"] <= b["ci_high"]


def test_pooled_unseen_summary_drops_source_and_sweep_rows():
    rows = hand_rows() + [dict(arm="plain", seed=0, source_site="a", site="sweep_noise", case_id="s1",
                               dice=0.0, role="unseen", axis="noise", severity=1.0)]
    (pooled,) = summarise_unseen(rows, n_boot=200)
    assert pooled["n_rows"] == 6 and pooled["mean"] == pytest.approx(4.4 / 6)
    assert pooled["worst_site"] == "b"


def test_grouping_pools_source_sites_when_asked():
    rows = hand_rows() + [dict(r, source_site="c", dice=r["dice"] - 0.2) for r in hand_rows() if r["site"] == "b"]
    per_site = {s["site"]: s for s in summarise(rows, by=("site",), n_boot=200)}
    assert per_site["b"]["n_rows"] == 12 and per_site["b"]["n_cases"] == 6
    assert per_site["b"]["mean"] == pytest.approx((4.4 + 4.4 - 6 * 0.2) / 12)
    assert per_site["b"]["worst_site_mean"] == pytest.approx((4.4 - 1.2) / 6)  # the c -> b stratum
    assert per_site["b"]["site_std"] == pytest.approx(0.2 / math.sqrt(2))       # two strata 0.2 apart, ddof=1
    with pytest.raises(ValueError, match="always part of the group"):
        summarise(rows, by=("arm",))


# ---------------------------------------------------------------- bootstrap

def loop_bootstrap(values: dict, n_boot: int, ci: float, seed: int) -> tuple[float, float]:
    """The documented draw order, written out replicate by replicate with plain Python loops."""
    seeds = sorted({k[0] for k in values})
    strata = sorted({k[1] for k in values}, key=str)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    totals = [0.0] * n_boot
    counts = [0] * n_boot
    for g in strata:
        k_max = max(len(values.get((s, g), [])) for s in seeds)
        u = rng.random((n_boot, len(seeds), k_max))
        for b in range(n_boot):
            for j in range(len(seeds)):
                cases = values.get((seeds[pick[b, j]], g), [])
                for k in range(len(cases)):
                    totals[b] += cases[int(u[b, j, k] * len(cases))]
                    counts[b] += 1
    reps = [t / c for t, c in zip(totals, counts) if c]
    a = (1 - ci) / 2 * 100
    return float(np.percentile(reps, a)), float(np.percentile(reps, 100 - a))


def test_hierarchical_bootstrap_equals_loop_written_out():
    values = {(0, "b"): [0.9, 0.4, 0.8], (1, "b"): [0.7, 0.6, 1.0, 0.5],
              (0, "c"): [0.3, 0.35], (2, "b"): [0.66]}          # seed 2 has no "c" cases
    got = hierarchical_bootstrap(values, n_boot=300, ci=0.9, seed=7)
    low, high = loop_bootstrap(values, n_boot=300, ci=0.9, seed=7)
    assert got.estimate == pytest.approx(np.mean([0.9, 0.4, 0.8, 0.7, 0.6, 1.0, 0.5, 0.3, 0.35, 0.66]))
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert hierarchical_bootstrap(values, n_boot=300, ci=0.9, seed=7) == got
    assert hierarchical_bootstrap(values, n_boot=300, ci=0.9, seed=8) != got


def test_one_seed_bootstrap_matches_normal_approximation():
    x = np.linspace(0.2, 1.0, 40)                      # sd (ddof 0) = 0.8 * sqrt((41 / 39) / 12)
    sd = 0.8 * math.sqrt((40 + 1) / (40 - 1) / 12)
    half = 1.959964 * sd / math.sqrt(40)
    got = hierarchical_bootstrap({(0, "b"): x}, n_boot=20_000, seed=1)
    assert got.low == pytest.approx(0.6 - half, abs=0.1 * half)
    assert got.high == pytest.approx(0.6 + half, abs=0.1 * half)


def test_seed_level_spread_widens_the_interval():
    # Two seeds 0.4 apart, tiny case noise: the CI must span the seeds, not the case noise alone.
    values = {(0, "b"): [0.50, 0.51, 0.49, 0.50], (1, "b"): [0.90, 0.91, 0.89, 0.90]}
    got = hierarchical_bootstrap(values, n_boot=4000, seed=0)
    assert got.low < 0.52 and got.high > 0.88


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ci"):
        hierarchical_bootstrap({(0, "b"): [1.0]}, ci=95)
    assert math.isnan(hierarchical_bootstrap({(0, "b"): [math.nan]}).estimate)


# ---------------------------------------------------------------- paired differences

def test_identical_arms_give_zero_difference_and_zero_width_ci():
    rows = hand_rows("plain") + hand_rows("dual")
    (d,) = paired_unseen(rows, n_boot=500)
    assert d["arm"] == "dual" and d["n_pairs"] == 6
    assert (d["mean_diff"], d["ci_low"], d["ci_high"]) == (0.0, 0.0, 0.0)
    assert d["excludes_zero"] is False


def test_constant_shift_gives_ci_on_the_shift():
    rows = hand_rows("plain") + hand_rows("dual", shift=0.05)
    by_site = {d["site"]: d for d in paired_differences(rows, n_boot=500)}
    for d in by_site.values():
        assert d["mean_diff"] == pytest.approx(0.05)
        assert d["ci_low"] == pytest.approx(0.05) and d["ci_high"] == pytest.approx(0.05)
        assert d["excludes_zero"] is True


def test_wilcoxon_p_equals_scipy_on_hand_typed_differences():
    plain = hand_rows("plain")
    dual = hand_rows("plain")
    bumps = [0.05, -0.02, 0.10, 0.03, 0.07, 0.01]       # dual - plain on the unseen rows, in HAND order
    unseen = [r for r in dual if r["role"] == "unseen"]
    for r, bump in zip(unseen, bumps):
        r["dice"] = round(r["dice"] + bump, 10)
    for r in dual:
        r["arm"] = "dual"
    (d,) = paired_unseen(plain + dual, n_boot=200)
    assert d["mean_diff"] == pytest.approx(sum(bumps) / 6)
    assert d["p_wilcoxon"] == pytest.approx(sps.wilcoxon(bumps).pvalue)
    assert wilcoxon_p(bumps + [math.nan]) == pytest.approx(sps.wilcoxon(bumps).pvalue)


def test_unmatched_rows_are_an_error_naming_them():
    dual = [r for r in hand_rows("dual") if r["case_id"] != "b2" or r["seed"] != 1]
    with pytest.raises(ValueError, match=r"1 row\(s\) of 'plain' without an 'dual' partner: seed=1.*case_id=b2"):
        pair_rows(hand_rows("plain") + dual)
    with pytest.raises(ValueError, match="two rows for"):
        pair_rows(hand_rows("plain") + hand_rows("dual") + hand_rows("dual")[:1])
    with pytest.raises(ValueError, match="reference arm 'plain' is not in the table"):
        pair_rows(hand_rows("dual"))


# ---------------------------------------------------------------- Pareto front

def test_pareto_front_two_objectives_mixed_senses():
    # (mean Dice up, std down): (0.8, 0.1) beats (0.7, 0.2); (0.9, 0.3) and (0.6, 0.05) trade off.
    points = [(0.8, 0.1), (0.7, 0.2), (0.9, 0.3), (0.6, 0.05), (0.8, 0.1), (0.5, 0.5)]
    assert pareto_front(points, ["max", "min"]) == [0, 2, 3, 4]     # the duplicate of 0 stays too
    assert pareto_front(points, ["min", "max"]) == [5]              # the opposite question


def test_pareto_front_three_objectives_nan_and_errors():
    points = [(1, 1, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2), (0.5, 0.5, 0.5), (math.nan, 9, 9), (1, 1, 0.9)]
    assert pareto_front(points, ["max"] * 3) == [0, 1, 2, 3]
    assert pareto_front([], ["max"]) == []
    assert pareto_front([(math.nan, 1.0)], ["max", "max"]) == []
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_front(points, ["max", "up", "min"])
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        pareto_front(points, ["max", "min"])


# ---------------------------------------------------------------- crossed design: missing cells, effect size

def test_missing_cell_of_an_exactly_additive_table_recovers_its_effects():
    # y = patient + seed exactly; one cell missing. The least-squares fit must recover both sets of effects:
    # seed part = var(seed effects, ddof 1) / 3, patient part = var(patient levels, ddof 1) / 4, no residual.
    patient, seed_eff = [0.5, 0.7, 0.6, 0.9], [0.0, 0.06, -0.03]
    rows = [dict(seed=s, stratum="b", case_id=f"c{p}", value=patient[p] + seed_eff[s])
            for p in range(4) for s in range(3) if (p, s) != (2, 1)]
    got = crossed_mean(rows)
    assert got.var_seed == pytest.approx(np.var(seed_eff, ddof=1) / 3)
    assert got.var_patient == pytest.approx(np.var(patient, ddof=1) / 4)
    assert got.n_cases == 4 and got.n_seeds == 3 and got.note == ""


def test_effect_size_is_mean_over_sd_of_per_patient_mean_differences():
    pairs = [dict(site="b", case_id=c, seed=s, diff=d) for c, ds in
             {"c0": [0.1, 0.3], "c1": [0.0, 0.0], "c2": [0.2, 0.4]}.items() for s, d in enumerate(ds)]
    per_patient = np.array([0.2, 0.0, 0.3])                  # each patient's mean over its two seeds
    assert effect_size(pairs) == pytest.approx(np.mean([0.1, 0.3, 0, 0, 0.2, 0.4]) / per_patient.std(ddof=1))


def test_drop_unmatched_keeps_complete_pairs_and_counts_the_rest():
    dual = [r for r in hand_rows("dual", shift=0.05) if not (r["seed"] == 1 and r["site"] == "b")]
    by_site = {d["site"]: d for d in paired_differences(hand_rows("plain") + dual, on_unmatched="drop")}
    assert by_site["b"]["n_pairs"] == 3 and by_site["b"]["n_unmatched"] == 3 and by_site["b"]["n_seeds"] == 1
    assert "one seed" in by_site["b"]["ci_note"] and math.isnan(by_site["b"]["p_value"])
    assert by_site["a"]["n_pairs"] == 6 and by_site["a"]["n_unmatched"] == 0
    with pytest.raises(ValueError, match="on_unmatched"):
        pair_rows(hand_rows("plain") + dual, on_unmatched="ignore")


def test_bootstrap_method_is_still_available_and_named():
    (b,) = [s for s in summarise(hand_rows(), n_boot=300, method="bootstrap") if s["site"] == "b"]
    assert b["ci_method"] == "bootstrap" and math.isnan(b["df"])
    assert (b["ci_low"], b["ci_high"]) == pytest.approx(
        tuple(loop_bootstrap({(0, ("a", "b")): HAND[(0, "b")], (1, ("a", "b")): HAND[(1, "b")]}, 300, 0.95, 0)))
    with pytest.raises(ValueError, match="method"):
        summarise(hand_rows(), method="jackknife")
