"""dualssl.report on small hand-built tables: files, embedded figures, table values, rows per group."""

from __future__ import annotations

import math
import re

import pytest

from dualssl.report import write_report
from dualssl.report.figures import OKABE_ITO, arm_colours
from dualssl.stats import holm, paired_differences, paired_unseen, unseen_rows
from dualssl.stats.cases import as_rows
from dualssl.stats.tables import format_number, format_p

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (source site, test site) -> Dice of cases c0..c2 for arm plain, seed 0; seed 1 adds 0.02; dual adds 0.1.
PLAIN = {("a", "a"): [0.9, 0.8, 0.85], ("a", "b"): [0.6, 0.3, 0.7], ("a", "c"): [0.5, 0.55, 0.45],
         ("b", "b"): [0.88, 0.9, 0.86], ("b", "a"): [0.7, 0.65, 0.6], ("b", "c"): [0.4, 0.2, 0.6]}


def table(sources=("a", "b"), arms=(("plain", 0.0), ("dual", 0.1)), sweep=True) -> list[dict]:
    rows = []
    for arm, shift in arms:
        for seed in (0, 1):
            for (src, site), values in PLAIN.items():
                if src not in sources:
                    continue
                for i, v in enumerate(values):
                    rows.append(dict(arm=arm, seed=seed, source_site=src, site=site, case_id=f"{site}{i}",
                                     dice=round(v + 0.02 * seed + shift, 6), hd95=1.0,
                                     role="source" if src == site else "unseen"))
            if sweep:
                for sev in (0.0, 1.0, 2.0):
                    for i in range(2):
                        rows.append(dict(arm=arm, seed=seed, source_site="a", site="sweep_noise", case_id=f"s{i}",
                                         dice=0.9 - 0.2 * sev + shift / 2 + 0.01 * i, role="unseen", axis="noise",
                                         severity=sev))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    meta = {"data": "hand-built table", "sites": ["a", "b", "c"], "arms": ["plain", "dual"], "seeds": 2,
            "wall_time_s": 3725}
    return write_report(table(), out, "Hand-built study", meta, n_boot=200)


def test_report_writes_every_file_and_valid_pngs(report):
    for key in ("markdown", "html", "summary_png", "strip_png", "forest_png", "heatmap_png", "robustness_png",
                "site_csv", "pooled_csv", "paired_csv", "sweep_csv"):
        assert report[key].is_file(), key
    for key in ("summary_png", "strip_png", "forest_png", "heatmap_png", "robustness_png"):
        assert report[key].read_bytes()[:8] == PNG_MAGIC, key


def test_html_is_self_contained_and_holds_the_values(report):
    page = report["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 5   # summary, forest, strip, heatmap, curves
    assert 'src="http' not in page and "<script" not in page and 'href="http' not in page
    assert "<style>" in page and "Hand-built study" in page and "1 h 02 min" in page
    # plain a -> b: seed 0 (0.6, 0.3, 0.7), seed 1 the same + 0.02: mean 0.543, one of three fails per seed.
    assert "0.543 [" in page and "33.3%" in page
    # dual - plain is exactly 0.1 everywhere: a zero-width CI at 0.100.
    assert "0.100 [0.100, 0.100]" in page


def test_markdown_table_has_one_row_per_arm_source_and_site(report):
    text = report["markdown"].read_text()
    section = text.split("## Per arm, source site and test site")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if re.match(r"\| (plain|dual) \|", line)]
    keys = {tuple(c.strip() for c in line.strip("|").split("|")[:3]) for line in lines}
    expected = {(arm, src, site) for arm in ("plain", "dual") for (src, site) in PLAIN}
    assert len(lines) == len(expected) and keys == expected
    assert "![" in text and "(summary.png)" in text and "data:image" not in text
    assert "- **Seeds:** 2" in text


def test_one_source_site_and_no_reference_leave_out_heatmap_and_forest(tmp_path):
    paths = write_report(table(sources=("a",), arms=(("dual", 0.0), ("gin", 0.05)), sweep=False), tmp_path,
                         "One source", {}, n_boot=100)
    assert {"heatmap_png", "forest_png", "paired_csv", "robustness_png"}.isdisjoint(paths)
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "No paired comparison" in page
    text = paths["markdown"].read_text()
    assert text.count("| dual | a |") == 3 and text.count("| gin | a |") == 3


def test_reference_arm_is_black_and_others_okabe_ito():
    colours = arm_colours(["plain", "dual", "bigaug"], "plain")
    assert colours == {"plain": "#000000", "dual": OKABE_ITO[0], "bigaug": OKABE_ITO[1]}


def seed_dominated_table(drop_dual_seed: int | None = None) -> list[dict]:
    """dual - plain = 0.10 under seed 0 and 0.16 under seed 1 (a seed part), plus 0.004 x case index."""
    rows = table(sweep=False)
    out = []
    for r in rows:
        if r["arm"] == "dual":
            if r["seed"] == drop_dual_seed and r["source_site"] == "a":
                continue                                      # the failed cell (dual, seed, source a)
            r = dict(r, dice=round(r["dice"] + 0.06 * r["seed"] + 0.004 * int(r["case_id"][-1]), 6))
        out.append(r)
    return out


def section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_report_shows_crossed_p_holm_effect_size_and_seed_advice(tmp_path):
    rows = seed_dominated_table()
    paths = write_report(rows, tmp_path, "Seed-dominated", {})
    text = paths["markdown"].read_text()
    per_site = paired_differences(unseen_rows(as_rows(rows)), by=("site",), on_unmatched="drop")
    # The paired table shows the crossed t-test p and Holm over its arms x sites, not the Wilcoxon p.
    paired_section = section(text, "Paired difference to plain")
    assert "| p | p (Holm) | d_z |" in paired_section and "Wilcoxon" not in paired_section
    assert [d["p_holm"] for d in per_site] == pytest.approx(holm([d["p_value"] for d in per_site]))
    for d in per_site:
        cells = [format_number(d["df"], 1), format_p(d["p_value"]), format_p(d["p_holm"]),
                 format_number(d["effect_size"], 2)]
        assert f"| dual | {d['site']} | {d['n_pairs']} | 2 | " in paired_section
        assert " | ".join(cells) in paired_section
    # Seed part 0.03 x 2 seeds dominates the tiny patient part: the report asks for more seeds.
    (pooled,) = paired_unseen(rows)
    assert pooled["se_seed"] > pooled["se_patient"] and pooled["seeds_for_balance"] > 2
    # 2 seeds per source site; the seed part falls as 1/seeds: balance at 2 x var_seed / var_patient seeds.
    assert pooled["seeds_for_balance"] == math.ceil(2 * pooled["se_seed"] ** 2 / pooled["se_patient"] ** 2)
    advice = section(text, "How many seeds")
    se_seed, se_patient = pooled["se_seed"], pooled["se_patient"]
    assert f"dual − plain: seed part of the SE {se_seed:.3g} > patient part {se_patient:.3g}" in advice
    assert f"about {pooled['seeds_for_balance']} seeds (per source site)" in advice
    methods = section(text, "How the numbers were computed")
    assert "crossed random factors" in methods and "IGNORES SEEDS" in methods and "up to 12.71" in methods


def test_failed_cell_leaves_the_report_on_complete_pairs(tmp_path):
    rows = seed_dominated_table(drop_dual_seed=1)
    paths = write_report(rows, tmp_path, "One cell failed", {})
    text = paths["markdown"].read_text()
    # plain's seed-1 rows of source a on its unseen sites lost their dual partner.
    lost = sum(1 for r in rows if r["arm"] == "plain" and r["seed"] == 1 and r["source_site"] == "a"
               and r["site"] != "a")
    assert f"(dual: {lost} row(s); rows of either arm vs plain)" in section(text, "Unseen sites, pooled (headline)")
    assert "paired_csv" in paths


def test_one_seed_gives_no_interval_and_says_why(tmp_path):
    rows = [r for r in table(sweep=False) if r["seed"] == 0]
    text = write_report(rows, tmp_path, "One seed", {})["markdown"].read_text()
    headline = section(text, "Unseen sites, pooled (headline)")
    assert "Intervals: one seed" in headline and "run >= 2 seeds" in headline
    assert "| plain | 12 | 1 | 0.521 [–, –] | – |" in headline
    assert "| 0.100 [–, –] | – | – | – | – | no |" in headline   # dual − plain: no CI, p or d_z


def test_robustness_curve_marks_severity_zero_at_the_base_level(monkeypatch):
    """Severity-0 rows (the base site's own cases, part ``severity-0``) become the curve's base point
    and a dotted line at the base's level."""
    from dualssl.data.phantom.sweeps import SEVERITY_ZERO_PART
    from dualssl.report import figures
    from dualssl.stats.cases import as_rows

    rows = as_rows(table(sources=("a",), arms=(("plain", 0.0),)))
    zero = [dict(r, axis="noise", severity=-1.0, part=SEVERITY_ZERO_PART) for r in rows
            if r["site"] == "a" and r["axis"] is None]
    drawn = {}
    real = figures.robustness_figure

    def spy(stats, arms, colours, metric="dice", base_levels=None):
        fig = real(stats, arms, colours, metric, base_levels)
        drawn.update(levels=base_levels, stats=stats, fig=fig)
        return fig

    monkeypatch.setattr(figures, "robustness_figure", spy)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        write_report(rows + zero, out, "severity 0", n_boot=50)
    assert drawn["levels"] == {"noise": -1.0}
    curve = sorted((r["severity"], round(r["mean"], 3)) for r in drawn["stats"])
    assert curve[0] == (-1.0, round(sum(r["dice"] for r in zero) / len(zero), 3))
    ax = drawn["fig"].axes[0]
    assert any(list(line.get_xdata()) == [-1.0, -1.0] for line in ax.lines)  # the dotted base line
