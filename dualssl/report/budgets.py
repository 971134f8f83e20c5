"""Reports of a study along a training-budget axis: one report per budget and a top-level summary.

A budgeted study names each arm ``ARM@B`` (``plain@300``: the arm ``plain`` trained for ``B``
iterations, ``studies/shift_budgets.py``). Comparing ``dual@1000`` with ``plain@100`` would mix the
method with the budget, so every paired statistic pairs **within a budget** (``X@B - REF@B``):

* ``budget-B/``: the usual study report (:func:`dualssl.report.write_report`) of the rows of budget
  ``B``, arm names without ``@B``, paired differences to the reference arm at that budget;
* the top-level folder: ``report.md`` / ``report.html`` with the "Budget axis" (a table arm x budget
  of the mean unseen Dice [95% CI] and the paired difference to the reference at each budget, a
  figure of Dice vs budget per arm with CI bars, links to the per-budget reports), the budget and
  wall time of every arm, the cells that did not finish, and ``budget_axis.csv`` (one row per arm
  and budget).

The numbers are those of the per-budget reports: ``summarise_unseen`` and ``paired_unseen``
(``dualssl.stats``, crossed patients x seeds intervals; ``p (Holm)`` adjusts over the arms of one
budget), recomputed on the same rows with the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dualssl.report import figures, html, markdown, study_sections
from dualssl.report.build import write_report
from dualssl.report.document import Document, Section, Table, facts_from_meta
from dualssl.report.stats_text import methods_note
from dualssl.stats.bootstrap import DEFAULT_N_BOOT
from dualssl.stats.cases import as_rows, ordered, unseen_rows
from dualssl.stats.paired import paired_unseen
from dualssl.stats.summary import FAIL_BELOW, summarise_unseen
from dualssl.stats.tables import format_ci, format_p, write_csv

BUDGET_SEP = "@"
"""``ARM@B``: an arm at a budget of ``B`` iterations."""


def budget_arm(arm: str, budget: int) -> str:
    """``plain``, 300 -> ``plain@300``."""
    return f"{arm}{BUDGET_SEP}{int(budget)}"


def split_budget_arm(name: str) -> tuple[str, int | None]:
    """``plain@300`` -> (``plain``, 300); a name without an integer ``@B`` -> (name, None)."""
    arm, sep, tail = str(name).rpartition(BUDGET_SEP)
    if sep and arm and tail.isdigit():
        return arm, int(tail)
    return str(name), None


def rows_of_budget(rows: Iterable[Mapping[str, Any]], budget: int, column: str = "arm") -> list[dict[str, Any]]:
    """The rows whose ``column`` names an arm at ``budget``, that name stripped of ``@B`` (other rows left out)."""
    out = []
    for r in rows:
        arm, b = split_budget_arm(r[column])
        if b == budget:
            out.append({**r, column: arm})
    return out


def budget_axis(rows: Iterable[Mapping[str, Any]], budgets: Sequence[int], reference: str, *,
                metric: str = "dice", n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                method: str = "crossed") -> list[dict[str, Any]]:
    """One row per (arm, budget) with unseen-site rows: ``arm``, ``budget``, the pooled statistics of
    ``summarise_unseen`` (``n_cases``, ``n_seeds``, ``mean``, ``ci_low``, ``ci_high``, ``df``) and, for
    arms other than ``reference`` whose budget has it, ``paired_unseen``'s difference to ``reference``
    at the same budget (``diff_*``: ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value``, ``p_holm``,
    ``n_pairs``, ``n_unmatched``; Holm over the arms of that budget)."""
    rows = as_rows(rows)
    kw = dict(metric=metric, n_boot=n_boot, seed=seed, method=method)
    out = []
    for budget in budgets:
        mine = rows_of_budget(rows, budget)
        if not unseen_rows(mine):
            continue
        arms = {r["arm"] for r in mine}
        diffs = ({d["arm"]: d for d in paired_unseen(mine, reference=reference, on_unmatched="drop", **kw)}
                 if reference in arms and len(arms) > 1 else {})
        for s in summarise_unseen(mine, **kw):
            row = {"arm": s["arm"], "budget": budget, "metric": metric,
                   **{k: s[k] for k in ("n_cases", "n_seeds", "mean", "ci_low", "ci_high", "df")}}
            d = diffs.get(s["arm"])
            if d is not None:
                row.update({"reference": reference, **{f"diff_{k}": d[k] for k in (
                    "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "n_pairs", "n_unmatched")}})
            out.append(row)
    return out


def budget_figure(axis: Sequence[Mapping[str, Any]], arms: Sequence[str], colours: Mapping[str, str],
                  metric: str = "dice") -> Figure:
    """Mean unseen-site ``metric`` vs budget (log x), one line per arm with 95% CI bars."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    budgets = sorted({r["budget"] for r in axis})
    for k, arm in enumerate(arms):
        pts = sorted((r for r in axis if r["arm"] == arm), key=lambda r: r["budget"])
        if not pts:
            continue
        shift = 1.0 + 0.02 * (k - (len(arms) - 1) / 2)  # a little apart, so that the bars do not overlap
        x = [r["budget"] * shift for r in pts]
        y = [r["mean"] for r in pts]
        low = [max(0.0, r["mean"] - r["ci_low"]) if r["ci_low"] == r["ci_low"] else 0.0 for r in pts]
        high = [max(0.0, r["ci_high"] - r["mean"]) if r["ci_high"] == r["ci_high"] else 0.0 for r in pts]
        ax.errorbar(x, y, yerr=[low, high], marker="o", markersize=4, capsize=3, color=colours[arm], label=arm)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("training budget (iterations)")
    ax.set_ylabel(f"mean unseen {figures.metric_label(metric)} (95% CI)")
    ax.axhline(FAIL_BELOW, color="0.6", linestyle="--", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def axis_table(axis: Sequence[Mapping[str, Any]], arms: Sequence[str], budgets: Sequence[int],
               reference: str, metric: str = "dice") -> Table:
    """Arm x budget: the mean [95% CI] at each budget, then the difference to ``reference`` at each budget."""
    cell = {(r["arm"], r["budget"]): r for r in axis}
    label = figures.metric_label(metric)
    header = (["arm"] + [f"{label} @{b} [95% CI]" for b in budgets]
              + [f"Δ vs {reference}@{b} [95% CI] (p Holm)" for b in budgets])
    body = []
    for arm in arms:
        means, diffs = [], []
        for b in budgets:
            r = cell.get((arm, b))
            means.append(format_ci(r["mean"], r["ci_low"], r["ci_high"]) if r else "–")
            if r and "diff_mean_diff" in r:
                diffs.append(f"{format_ci(r['diff_mean_diff'], r['diff_ci_low'], r['diff_ci_high'])} "
                             f"(p {format_p(r['diff_p_holm'])})")
            else:
                diffs.append("reference" if arm == reference and r else "–")
        body.append([arm, *means, *diffs])
    return Table(header, body)


def write_budget_reports(rows: Iterable[Mapping[str, Any]], out_dir: str | Path, title: str,
                         meta: Mapping[str, Any], budgets: Sequence[int], *, reference: str = "plain",
                         cells: Sequence[Mapping[str, Any]] = (), arms_info: Sequence[Mapping[str, str]] = (),
                         failed_cells: Sequence[Mapping[str, Any]] = (), metric: str = "dice",
                         n_boot: int = DEFAULT_N_BOOT, seed: int = 0, method: str = "crossed",
                         extra_sections: Sequence[Section] = ()) -> dict[str, Any]:
    """Write ``budget-B/`` (a full report per budget with rows) and the top-level report into ``out_dir``.

    Args:
        rows: per-case rows whose ``arm`` is ``ARM@B`` (``dualssl.stats.read_cases`` of ``cases.csv``).
        budgets: the study's budgets (iterations), in the order given.
        cells: ``cells.csv`` rows (arm ``ARM@B``): the budget and wall-time section, the cell counts.
        arms_info: ``describe_arms`` rows of the ``ARM@B`` arms (differences from ``REF@B``).
        failed_cells: the cells that did not finish.
        extra_sections: sections of the whole study (fingerprint, intensity), in the top-level report
            after the arms.

    Returns:
        ``markdown``, ``html``, ``axis_csv`` (top level; ``budget_png`` when a budget has unseen rows)
        and ``budgets``: ``{B: write_report's paths}`` for each budget with rows.
    """
    rows = as_rows(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stat_kw = dict(metric=metric, n_boot=n_boot, seed=seed, method=method)
    per_budget: dict[int, dict[str, Path]] = {}
    for b in budgets:
        mine = rows_of_budget(rows, b)
        if not mine:
            continue
        cells_b = rows_of_budget(cells, b)
        section = study_sections.budget_section(cells_b)
        per_budget[b] = write_report(
            mine, out / f"budget-{b}", f"{title}: budget {b} iterations", {**meta, "budget": f"{b} iterations"},
            reference=reference, arms_info=rows_of_budget(arms_info, b),
            failed_cells=rows_of_budget(failed_cells, b), total_cells=len(cells_b) or None,
            extra_sections=[section] if section else [], **stat_kw)
    axis = budget_axis(rows, budgets, reference, **stat_kw)
    arms = ordered((split_budget_arm(r["arm"])[0] for r in rows), first=[reference])
    paths: dict[str, Any] = {"axis_csv": write_csv(axis, out / "budget_axis.csv"), "budgets": per_budget}

    doc = Document(title, facts_from_meta({**meta, "budgets": [f"{b} iterations" for b in budgets],
                                           "reference": f"{reference} at the same budget"}))
    if failed_cells:
        doc.sections.append(study_sections.failed_section(failed_cells, len(cells) or len(failed_cells)))
    links = [(f"budget {b}: report.{kind}", f"budget-{b}/report.{kind}") for b in per_budget for kind in ("html", "md")]
    figure = None
    if axis:
        paths["budget_png"] = figure = figures.save_png(
            budget_figure(axis, arms, figures.arm_colours(arms, reference), metric), out / "budget_axis.png")
    doc.sections.append(Section(
        "Budget axis",
        f"Each arm at each training budget (iterations = optimizer steps), pooled over every unseen-site case "
        f"of every source site and seed. Differences pair within a budget: arm@B − {reference}@B, matched on "
        f"(seed, source site, site, case); p (Holm) adjusts over the arms of one budget. The numbers are "
        f"those of each budget's own report (linked below), with per-site tables and figures.",
        axis_table(axis, arms, list(budgets), reference, metric), figure,
        "Mean unseen-site score vs training budget, 95% CI bars; the dashed line marks failure.", links))
    section = study_sections.budget_section(cells)
    if section is not None:
        doc.sections.append(section)
    if arms_info:
        doc.sections.append(study_sections.arms_section(arms_info, f"{reference}@B"))
    doc.sections.extend(extra_sections)
    n_seeds = min((r["n_seeds"] for r in axis), default=0)
    if method == "crossed":
        doc.sections.append(Section("How the numbers were computed", methods_note(n_seeds, metric, FAIL_BELOW)))
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown.render(doc))
    paths["html"] = out / "report.html"
    paths["html"].write_text(html.render(doc))
    return paths
