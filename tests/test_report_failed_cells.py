"""The report of a study with a failed cell, and its distance table: hand-built per-case tables."""

from __future__ import annotations

import csv
import math

from dualssl.report import write_report

WORST = 150.0


def _rows(failed: tuple[str, int] | None = None) -> list[dict]:
    """plain / dual / gin x seeds 0-2 x unseen sites b, c x 4 cases; dual = plain + 0.1 Dice. ``failed``
    (arm, seed): that cell's rows are absent, as when its trial errored."""
    rows = []
    for arm, shift in (("plain", 0.0), ("dual", 0.1), ("gin", 0.05)):
        for seed in range(3):
            if failed == (arm, seed):
                continue
            for site in ("b", "c"):
                for i in range(4):
                    missed = arm == "dual" and i == 3  # dual misses the hard case: better plain HD95
                    hd = 5.0 + i if arm != "dual" else 3.0
                    rows.append(dict(arm=arm, seed=seed, source_site="a", site=site, case_id=f"{site}{i}",
                                     role="unseen", dice=0.0 if missed else 0.5 + 0.05 * i + shift + 0.01 * seed,
                                     hd95=math.nan if missed else hd, asd=math.nan if missed else hd / 3,
                                     hd95_penalised=WORST if missed else hd, asd_penalised=WORST if missed else hd / 3,
                                     missed=int(missed)))
    return rows


def test_a_failed_cell_is_named_and_the_rest_still_compared(tmp_path):
    failed = [{"cell": "plain-s1-a", "arm": "plain", "seed": 1, "source_site": "a", "status": "error",
               "error": "TrainingFailedError: NotADirectoryError: /dev/null/cache"}]
    paths = write_report(_rows(failed=("plain", 1)), tmp_path, "Failed cell", {"cells": "8 of 9 finished"},
                         n_boot=200, failed_cells=failed, total_cells=9,
                         arms_info=[{"arm": "plain", "settings_from": "default recipe", "differences": "none"},
                                    {"arm": "dual", "settings_from": "default recipe",
                                     "differences": "loss.lambda_con: 0.0 -> 0.1"}])
    text = paths["markdown"].read_text()
    assert "## Cells that did not finish (1 of 9)" in text and "plain-s1-a" in text and "/dev/null/cache" in text
    # dual and gin are each compared on the seeds where plain finished: 2 seeds x 8 cases
    assert "left out of the paired comparison (dual: 8 row(s)" in text
    with open(paths["paired_csv"], newline="") as fh:
        pooled = [r for r in csv.DictReader(fh) if not r.get("site")]
    assert {r["arm"]: int(r["n_pairs"]) for r in pooled} == {"dual": 16, "gin": 16}
    assert "## Arms" in text and "loss.lambda_con: 0.0 -> 0.1" in text


def test_distances_rank_arms_on_the_penalised_hd95_with_n_missed_beside(tmp_path):
    text = write_report(_rows(), tmp_path, "Distances", n_boot=200)["markdown"].read_text()
    section = text.split("## Surface distances on unseen sites (misses penalised)")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    order = [line.split("|")[1].strip() for line in lines]
    # dual's plain HD95 (3 mm on the cases it found) is the best, but it missed 6 cases: ranked last
    assert order == ["plain", "gin", "dual"]
    dual = lines[-1].split("|")
    assert dual[3].strip() == "6" and dual[5].strip() == "3.00"
    # penalised mean of dual: 18 cases at 3 mm, 6 at WORST
    assert dual[4].strip().startswith(f"{(18 * 3.0 + 6 * WORST) / 24:.2f}")
