"""``write_report``: per-case rows -> statistics -> figures -> report.md, report.html, PNGs and CSVs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dualssl.data.phantom.sweeps import SEVERITY_ZERO_PART
from dualssl.report import figures, html, markdown, study_sections
from dualssl.report.document import Document, Section, Table, facts_from_meta
from dualssl.report.stats_text import interval_notes, methods_note, seed_advice, unmatched_note
from dualssl.stats.bootstrap import DEFAULT_N_BOOT
from dualssl.stats.cases import as_rows, is_sweep, ordered, unseen_rows
from dualssl.stats.paired import paired_differences
from dualssl.stats.summary import FAIL_BELOW, summarise
from dualssl.stats.tables import format_ci, format_number, format_p, write_csv

def _pooled_table(pooled: list[dict], paired: list[dict], reference: str, metric: str) -> Table:
    diffs = {r["arm"]: r for r in paired}
    label = figures.metric_label(metric)
    header = ["arm", "cases", "seeds", f"mean {label} [95% CI]", "df", "median", f"fail < {FAIL_BELOW}",
              "case std", "seed std", "worst site (mean)", "site std",
              f"Δ vs {reference} [95% CI]", "df (Δ)", "p", "p (Holm)", "d_z", "CI excludes 0"]
    rows = []
    for r in pooled:
        d = diffs.get(r["arm"])
        rows.append([r["arm"], str(r["n_cases"]), str(r["n_seeds"]), format_ci(r["mean"], r["ci_low"], r["ci_high"]),
                     format_number(r["df"], 1), format_number(r["median"]), f"{100 * r['fail_rate']:.1f}%",
                     format_number(r["case_std"]), format_number(r["seed_std"]),
                     f"{r['worst_site']} ({format_number(r['worst_site_mean'])})" if r["worst_site"] else "–",
                     format_number(r["site_std"]),
                     format_ci(d["mean_diff"], d["ci_low"], d["ci_high"]) if d else "–",
                     *(_test_cells(d) if d else ["–"] * 4), format_number(d["excludes_zero"]) if d else "–"])
    return Table(header, rows)


def _test_cells(d: dict) -> list[str]:
    """df, p, Holm-adjusted p and effect size of one paired-difference row, formatted."""
    return [format_number(d["df"], 1), format_p(d["p_value"]), format_p(d["p_holm"]),
            format_number(d["effect_size"], 2)]


def _site_table(site_stats: list[dict], metric: str) -> Table:
    header = ["arm", "source site", "site", "role", "cases", "seeds",
              f"mean {figures.metric_label(metric)} [95% CI]", "df", "median", f"fail < {FAIL_BELOW}", "seed std",
              "case std"]
    rows = [[r["arm"], r["source_site"], r["site"], r["role"] or "–", str(r["n_cases"]), str(r["n_seeds"]),
             format_ci(r["mean"], r["ci_low"], r["ci_high"]), format_number(r["df"], 1), format_number(r["median"]),
             f"{100 * r['fail_rate']:.1f}%", format_number(r["seed_std"]), format_number(r["case_std"])]
            for r in site_stats]
    return Table(header, rows)


def _paired_table(per_site: list[dict], reference: str) -> Table:
    header = ["arm", "site", "pairs", "seeds", f"Δ vs {reference} [95% CI]", "df", "p", "p (Holm)", "d_z",
              "CI excludes 0"]
    rows = [[r["arm"], r["site"], str(r["n_pairs"]), str(r["n_seeds"]),
             format_ci(r["mean_diff"], r["ci_low"], r["ci_high"]), *_test_cells(r),
             format_number(r["excludes_zero"])] for r in per_site]
    return Table(header, rows)


def write_report(rows: Iterable[Mapping[str, Any]], out_dir: str | Path, title: str,
                 meta: Mapping[str, Any] | None = None, *, reference: str = "plain", metric: str = "dice",
                 n_boot: int = DEFAULT_N_BOOT, seed: int = 0, method: str = "crossed",
                 arms_info: Sequence[Mapping[str, str]] = (), failed_cells: Sequence[Mapping[str, Any]] = (),
                 total_cells: int | None = None, extra_sections: Sequence[Section] = ()) -> dict[str, Path]:
    """Write the study report into ``out_dir`` and return its files by name.

    Always: ``markdown`` (report.md), ``html`` (report.html, self-contained), ``summary_png``,
    ``strip_png``, ``site_csv``, ``pooled_csv``. With the reference arm and another arm:
    ``forest_png``, ``paired_csv``. With several source sites: ``heatmap_png``. With sweep rows
    (``axis``/``severity``): ``robustness_png``, ``sweep_csv``.

    Args:
        rows: per-case rows (``dualssl.stats.read_cases``).
        meta: study facts for the header (data, sites, arms, seeds, wall_time_s, ...), in order.
        reference: the arm every other arm is compared with.
        metric: the per-case column the report is about.
        method: ``"crossed"`` (patients x seeds t intervals and tests, ``dualssl.stats.crossed``) or
            ``"bootstrap"`` (the older hierarchical bootstrap; ``n_boot``/``seed`` only matter there).

    Paired comparisons use complete pairs only: rows whose partner arm has no row (a failed cell) are
    left out and counted in the text and in ``n_unmatched``.
        arms_info: ``studies.shift_arms.describe_arms`` rows (arm, settings_from, differences): an "Arms" section.
        failed_cells: cells that did not finish (cell, arm, seed, source_site, status, error), named in
            their own section; out of ``total_cells``.
        extra_sections: sections the study adds after "Arms" (e.g. ``study_sections.budget_section``, the
            dataset fingerprint ``studies.preprocess.fingerprint_sections``); a figure must lie in
            ``out_dir`` (the Markdown links it by file name, the HTML embeds it).
    """
    rows = as_rows(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stat_kw = dict(metric=metric, n_boot=n_boot, seed=seed, method=method)
    pair_kw = dict(stat_kw, reference=reference, on_unmatched="drop")
    arms = ordered((r["arm"] for r in rows), first=[reference])
    colours = figures.arm_colours(arms, reference)
    plain_rows = [r for r in rows if not is_sweep(r)]
    sweep_rows = [r for r in rows if is_sweep(r)]
    unseen = unseen_rows(rows)
    sites = ordered(r["site"] for r in unseen)
    paths: dict[str, Path] = {}

    def by_arm(stats: list[dict]) -> list[dict]:  # reference first, then the arms in order; stable within
        return sorted(stats, key=lambda r: arms.index(r["arm"]))

    site_stats = by_arm(summarise(plain_rows, **stat_kw))
    pooled = by_arm(summarise(unseen, by=(), **stat_kw)) if unseen else []
    paths["site_csv"] = write_csv(site_stats, out / "site_stats.csv")
    paths["pooled_csv"] = write_csv(pooled, out / "pooled_unseen.csv")
    compare = reference in arms and len(arms) > 1 and bool(unseen)
    paired_site = by_arm(paired_differences(unseen, by=("site",), **pair_kw)) if compare else []
    paired_pool = by_arm(paired_differences(unseen, by=(), **pair_kw)) if compare else []
    if compare:
        paths["paired_csv"] = write_csv(paired_pool + paired_site, out / "paired_differences.csv")

    doc = Document(title, facts_from_meta(meta or {}))
    if failed_cells:
        doc.sections.append(study_sections.failed_section(failed_cells, total_cells or len(failed_cells)))
    doc.sections.append(Section(
        "Unseen sites, pooled (headline)",
        "Each arm over every unseen-site case of every source site and seed. CIs, df and p: crossed "
        "patients x seeds analysis (see the last section); p (Holm) adjusts over the arms of this table."
        + unmatched_note(paired_pool, reference) + interval_notes(pooled, paired_pool)
        + ("" if compare else f" No paired comparison: the table needs the reference arm {reference!r} "
                              f"and at least one other arm."),
        _pooled_table(pooled, paired_pool, reference, metric)))

    fig = figures.summary_figure(paired_site, paired_pool, unseen, arms, sites, colours, metric, reference)
    paths["summary_png"] = figures.save_png(fig, out / "summary.png")
    doc.sections.append(Section("At a glance", figure=paths["summary_png"],
                                caption="Left: paired difference to the reference with 95% CI. "
                                        "Right: per-case values on unseen sites; dashed line = failure."))
    if compare:
        paths["forest_png"] = figures.save_png(
            figures.forest_figure(paired_site, paired_pool, arms, colours, metric, reference), out / "forest.png")
        doc.sections.append(Section(
            f"Paired difference to {reference}",
            "Per unseen test site, pooled over source sites and seeds; p (Holm) adjusts over all arms x sites "
            "of this table." + unmatched_note(paired_site, reference),
            _paired_table(paired_site, reference), paths["forest_png"],
            f"Arm − {reference}, mean of paired differences with 95% CI; the line marks no difference."))

    distances = study_sections.distance_section(unseen, arms, n_boot=n_boot, seed=seed)
    if distances is not None:
        doc.sections.append(distances)
    if arms_info:
        doc.sections.append(study_sections.arms_section(arms_info, reference))
    doc.sections.extend(extra_sections)
    doc.sections.append(Section("Per arm, source site and test site",
                                "Source-site rows are that site's own validation cases.",
                                _site_table(site_stats, metric)))
    paths["strip_png"] = figures.save_png(figures.strip_figure(unseen, arms, sites, colours, metric),
                                          out / "per_site.png")
    doc.sections.append(Section("Per-case distribution on unseen sites", figure=paths["strip_png"],
                                caption="Boxes: quartiles and median; points: cases (all seeds)."))
    if len({r["source_site"] for r in plain_rows}) > 1:
        paths["heatmap_png"] = figures.save_png(figures.heatmap_figure(site_stats, arms, metric),
                                                out / "train_test_heatmap.png")
        doc.sections.append(Section("Train site x test site", figure=paths["heatmap_png"],
                                    caption=f"Mean {metric}; rows = source (training) site, columns = test "
                                            f"site; outlined cells = the source site's own validation."))
    if sweep_rows:
        sweep_stats = summarise(sweep_rows, by=(), **stat_kw)
        paths["sweep_csv"] = write_csv(sweep_stats, out / "sweep_stats.csv")
        base_levels = {r["axis"]: r["severity"] for r in sweep_rows if r.get("part") == SEVERITY_ZERO_PART}
        paths["robustness_png"] = figures.save_png(
            figures.robustness_figure(sweep_stats, arms, colours, metric, base_levels), out / "robustness.png")
        doc.sections.append(Section("Robustness to shift severity", figure=paths["robustness_png"],
                                    caption="Mean over sources, seeds and cases per severity; bands = 95% CI. "
                                            "Dotted line: severity 0, the base site's own cases (other patients "
                                            "than the sweep's; its validation cases when it is the source)."))
    advice = seed_advice(paired_pool, pooled, reference) if method == "crossed" else ""
    if advice:
        doc.sections.append(Section("How many seeds", advice))
    n_seeds = min((r["n_seeds"] for r in pooled), default=0)
    note = methods_note(n_seeds, metric, FAIL_BELOW) if method == "crossed" else (
        f"Bootstrap method: hierarchical percentile bootstrap ({n_boot} replicates) resampling seeds, then "
        f"cases within each (source site, test site) independently per seed; too narrow when seeds share "
        f"patients (issue 25), kept for comparison only.")
    doc.sections.append(Section("How the numbers were computed", note))

    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown.render(doc))
    paths["html"] = out / "report.html"
    paths["html"].write_text(html.render(doc))
    return paths
