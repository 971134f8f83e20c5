"""The report of a budgeted study (one report per budget, the budget axis) and every study's budget and
wall-time section: hand-built ``cases.csv`` / ``cells.csv`` files with a known truth, through the real
``read_cases`` and ``write_report``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.report import write_report  # noqa: E402
from dualssl.report.budgets import budget_axis, split_budget_arm, write_budget_reports  # noqa: E402
from dualssl.report.study_sections import budget_section  # noqa: E402
from dualssl.stats import paired_unseen, read_cases  # noqa: E402
from studies.shift_table import CASE_COLUMNS, write_csv  # noqa: E402

SHIFT = {("dual", 4): -0.05, ("dual", 8): 0.10, ("gin", 4): 0.02, ("gin", 8): 0.0}
"""The true difference to plain at each budget: every case of every seed moves by exactly this much."""


def _case_rows() -> list[dict]:
    """plain / dual / gin at budgets 4 and 8 x seeds 0-2 x unseen sites b, c x 4 cases (+ source
    validation), but gin@4 of seed 2. plain@8 is not plain@4 shifted: a pairing across budgets gives other
    differences."""
    rows = []
    for budget in (4, 8):
        for arm in ("plain", "dual", "gin"):
            for seed in range(3):
                if (arm, budget, seed) == ("gin", 4, 2):
                    continue  # its cell did not finish (cells.csv)
                for site, role in (("a", "source"), ("b", "unseen"), ("c", "unseen")):
                    for i in range(4 if role == "unseen" else 2):
                        base = 0.4 + 0.07 * i + 0.02 * seed + (0.03 * i * i if budget == 8 else 0.01 * seed)
                        dice = base + SHIFT.get((arm, budget), 0.0)
                        rows.append({"arm": f"{arm}@{budget}", "seed": seed, "source_site": "a", "site": site,
                                     "case_id": f"{site}{i}", "role": role, "part": "report" if role == "unseen"
                                     else "source", "dice": dice, "hd95": 5.0, "asd": 2.0, "missed": 0,
                                     "hd95_penalised": 5.0, "asd_penalised": 2.0,
                                     "cell": f"{arm}@{budget}-s{seed}-a", "trial_id": f"t{budget}{arm}{seed}"})
    return rows


def _cell_rows() -> list[dict]:
    """cells.csv: our engine's arms (batch 2 x 16384 voxels) and an nnU-Net-like gin for the section's
    system column; wall 10, 20, 30 s for the three seeds of plain@8; gin@4's seed 2 did not finish."""
    rows = []
    for budget in (4, 8):
        for arm in ("plain", "dual", "gin"):
            for seed in range(3):
                failed = (arm, budget, seed) == ("gin", 4, 2)
                peer = arm == "gin"
                rows.append({"cell": f"{arm}@{budget}-s{seed}-a", "arm": f"{arm}@{budget}", "seed": seed,
                             "source_site": "a", "status": "error" if failed else "completed",
                             "error": "RuntimeError: boom" if failed else "", "budget": budget,
                             "budget_iterations": budget, "batch_size": 2, "patch_size": "64x64x32" if peer
                             else "32x32x16", "patch_voxels": 131072 if peer else 16384,
                             "wall_s": 10.0 * (seed + 1) * (2 if peer else 1),
                             "system": "nnunet: nnU-Net pipeline, capped plan" if peer else "dualssl engine"})
    return rows


@pytest.fixture()
def study_files(tmp_path) -> tuple[Path, Path]:
    cases = write_csv(_case_rows(), tmp_path / "cases.csv", CASE_COLUMNS)
    cells = write_csv(_cell_rows(), tmp_path / "cells.csv")
    return cases, cells


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_arm_names_carry_the_budget():
    assert split_budget_arm("nnunet-da5@300") == ("nnunet-da5", 300)
    assert split_budget_arm("plain") == ("plain", None)
    assert split_budget_arm("odd@name") == ("odd@name", None)


def test_per_budget_reports_pair_within_each_budget(study_files, tmp_path):
    cases, cells = study_files
    out = tmp_path / "report"
    paths = write_budget_reports(read_cases(cases), out, "Budgets", {"seeds": [0, 1, 2]}, [4, 8],
                                 reference="plain", cells=_read(cells), n_boot=200,
                                 failed_cells=[c for c in _read(cells) if c["status"] != "completed"])
    assert sorted(paths["budgets"]) == [4, 8]
    for budget in (4, 8):
        folder = out / f"budget-{budget}"
        pooled = {r["arm"]: r for r in _read(folder / "paired_differences.csv") if not r.get("site")}
        assert set(pooled) == {"dual", "gin"}  # arm names without @B, the reference plain@B
        for arm in ("dual", "gin"):
            assert float(pooled[arm]["mean_diff"]) == pytest.approx(SHIFT[(arm, budget)], abs=1e-9)
            assert int(pooled[arm]["n_pairs"]) == (2 if (arm, budget) == ("gin", 4) else 3) * 8
        text = (folder / "report.md").read_text()
        assert f"- **Budget:** {budget} iterations" in text
        section = text.split("## Budget and wall time per arm")[1].split("\n## ")[0]
        assert "| plain | 3 | " + str(budget) + " | 2 | 16384 |" in section
    # the axis: the same statistics as each budget's report, arm x budget
    axis = {(r["arm"], int(r["budget"])): r for r in _read(paths["axis_csv"])}
    assert set(axis) == {(a, b) for a in ("plain", "dual", "gin") for b in (4, 8)}
    assert float(axis[("dual", 8)]["diff_mean_diff"]) == pytest.approx(0.10, abs=1e-9)
    assert axis[("plain", 8)]["diff_mean_diff"] == ""  # the reference has no difference to itself
    own = {r["arm"]: r for r in _read(out / "budget-8" / "pooled_unseen.csv")}
    assert float(axis[("gin", 8)]["mean"]) == pytest.approx(float(own["gin"]["mean"]), abs=1e-12)
    assert float(axis[("gin", 8)]["ci_low"]) == pytest.approx(float(own["gin"]["ci_low"]), abs=1e-12)
    top = paths["markdown"].read_text()
    assert "## Budget axis" in top and "Dice @4 [95% CI]" in top and "Δ vs plain@8 [95% CI] (p Holm)" in top
    assert "- [budget 8: report.html](budget-8/report.html)" in top and "![" in top
    assert (out / "budget_axis.png").is_file()
    assert '<a href="budget-4/report.html">' in paths["html"].read_text()
    assert "## Cells that did not finish (1 of 18)" in top and "gin@4-s2-a" in top
    wall = top.split("## Budget and wall time per arm")[1].split("\n## ")[0]
    assert "| plain@8 | 3 | 8 | 2 | 16384 | 3 | 20 | 10 | 30 | dualssl engine |" in wall
    # gin@4: 2 of 3 cells finished, the failed one's time left out
    assert "| gin@4 | 3 | 4 | 2 | 131072 | 2 | 30 | 20 | 40 | nnunet: nnU-Net pipeline, capped plan |" in wall


def test_pairing_across_budgets_would_give_other_numbers(study_files):
    """The truth of the test above is not an accident of the table: dual@8 - plain@4 is not 0.10."""
    rows = [{**r, "arm": {"dual@8": "dual", "plain@4": "plain"}.get(r["arm"], "x")} for r in read_cases(study_files[0])]
    across = paired_unseen([r for r in rows if r["arm"] != "x"], reference="plain")
    assert abs(across[0]["mean_diff"] - 0.10) > 0.01
    within = budget_axis(read_cases(study_files[0]), [8], "plain")
    assert {r["arm"]: r.get("diff_mean_diff") for r in within}["dual"] == pytest.approx(0.10, abs=1e-9)


def test_every_study_reports_budget_and_wall_time(study_files, tmp_path):
    """Without --budgets: the usual report with the section, from cells.csv."""
    cases, cells = study_files
    rows = [r for r in read_cases(cases) if r["arm"].endswith("@8")]
    paths = write_report(rows, tmp_path / "r", "No budgets", n_boot=200, reference="plain@8",
                         extra_sections=[budget_section(_read(cells))])
    text = paths["markdown"].read_text()
    assert text.index("## Budget and wall time per arm") < text.index("## Per arm, source site and test site")
    assert "| dual@4 | 3 | 4 | 2 | 16384 | 3 | 20 | 10 | 30 | dualssl engine |" in text
    assert budget_section([{"arm": "plain", "status": "completed"}]) is None  # an old cells.csv: no section


def test_terminal_headline_of_a_budgeted_study(study_files, tmp_path):
    from studies.shift_console import budget_headline

    cases, _ = study_files
    paths = write_budget_reports(read_cases(cases), tmp_path, "t", {}, [4, 8], n_boot=200)
    lines = budget_headline(paths["budgets"], _read(cases), phantom=False, reference="plain")
    assert "Δ vs plain@B" in lines[1]
    by_arm = {line.split()[0]: line for line in lines[2:]}
    assert sorted(by_arm) == sorted(f"{a}@{b}" for a in ("plain", "dual", "gin") for b in (4, 8))
    assert by_arm["dual@8"].split()[5] == "0.100" and by_arm["dual@4"].split()[5] == "-0.050"
