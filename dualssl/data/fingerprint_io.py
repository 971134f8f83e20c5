"""The fingerprint as a terminal table, ``fingerprint.json`` / ``fingerprint.csv`` and a figure.

Inputs are what :mod:`dualssl.data.fingerprint` returns; nothing here reads a scan. On the phantom
the numbers describe a test fixture, not real hospitals.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from dualssl.data.fingerprint import CaseFingerprint, to_json

JSON_NAME, CSV_NAME, FIGURE_NAME = "fingerprint.json", "fingerprint.csv", "fingerprint.png"


def _num(v: float, digits: int = 2) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def site_table(summary: dict[str, dict[str, Any]], differences: dict[str, list[str]] | None = None,
               source: str | None = None) -> str:
    """One line per site (medians over cases; p10-p90 of slice thickness), then what differs from ``source``."""
    head = (f"{'site':<18} {'n':>3}  {'spacing X,Y,Z mm (median)':<26} {'slice p10-p90':<13} "
            f"{'shape X,Y,Z (median)':<20} {'orient':<7} {'dtype':<7} {'body p50':>8} "
            f"{'label p0.5/p50/p99.5 HU':<24} {'label ml':>8}")
    lines = [head, "-" * len(head)]
    for site, s in summary.items():
        sp = ",".join(_num(d["median"]) for d in s["spacing"])
        sh = ",".join(str(int(d["median"])) if not math.isnan(d["median"]) else "nan" for d in s["shape"])
        st = f"{_num(s['slice_thickness']['p10'], 1)}-{_num(s['slice_thickness']['p90'], 1)}"
        fg = s["foreground_percentiles"]
        fgs = f"{_num(fg['p0.5'], 0)}/{_num(fg['p50'], 0)}/{_num(fg['p99.5'], 0)}"
        mark = "*" if site == source else ""
        lines.append(f"{site + mark:<18} {s['count']:>3}  {sp:<26} {st:<13} {sh:<20} "
                     f"{'/'.join(s['orientation']):<7} {'/'.join(s['dtype']):<7} "
                     f"{_num(s['body_percentiles']['p50'], 0):>8} {fgs:<24} {_num(s['label_ml']['median'], 1):>8}")
    if source:
        lines.append(f"* source site {source}; how the other sites differ from it:")
        for site, notes in (differences or {}).items():
            lines.append(f"  {site}: {'; '.join(notes) if notes else 'no difference above the tolerances'}")
    return "\n".join(lines)


SITE_COLUMNS = ["site", "cases", "spacing X,Y,Z mm (median)", "slice mm p10-p90", "shape X,Y,Z (median)",
                "orientation", "dtype", "body HU p50", "label HU p0.5/p50/p99.5", "label ml (median)",
                "differs from the source in"]


def site_cells(summary: dict[str, dict[str, Any]], differences: dict[str, list[str]] | None = None,
               source: str | None = None) -> list[list[str]]:
    """The per-site numbers of :func:`site_table` as rows of text cells (columns :data:`SITE_COLUMNS`),
    for a report table; the source site's last cell says it is the source."""
    rows = []
    for site, s in summary.items():
        fg = s["foreground_percentiles"]
        notes = (differences or {}).get(site)
        rows.append([site, str(s["count"]), ", ".join(_num(d["median"]) for d in s["spacing"]),
                     f"{_num(s['slice_thickness']['p10'], 1)}-{_num(s['slice_thickness']['p90'], 1)}",
                     " x ".join(str(int(d["median"])) if not math.isnan(d["median"]) else "nan" for d in s["shape"]),
                     "/".join(s["orientation"]), "/".join(s["dtype"]), _num(s["body_percentiles"]["p50"], 0),
                     f"{_num(fg['p0.5'], 0)} / {_num(fg['p50'], 0)} / {_num(fg['p99.5'], 0)}",
                     _num(s["label_ml"]["median"], 1),
                     "(source site)" if site == source else ("; ".join(notes) if notes else
                                                             "nothing above the tolerances" if notes is not None
                                                             else "–")])
    return rows


def write_fingerprint(out_dir: str | Path, rows: Sequence[CaseFingerprint], summary: dict[str, dict[str, Any]],
                      differences: dict[str, list[str]] | None = None, source: str | None = None,
                      figure: bool = True) -> dict[str, Path]:
    """``fingerprint.json`` (per site and per case), ``fingerprint.csv`` (per case) and, if asked,
    ``fingerprint.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "csv": out / CSV_NAME}
    paths["json"].write_text(json.dumps(to_json(rows, summary, differences, source), indent=1))
    table = [r.row() for r in rows]
    with paths["csv"].open("w", newline="") as fh:
        if table:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    if figure and rows:
        paths["figure"] = plot_fingerprint(rows, out / FIGURE_NAME, source)
    return paths


def plot_fingerprint(rows: Sequence[CaseFingerprint], path: str | Path, source: str | None = None) -> Path:
    """Per site, one point per case: slice thickness, in-plane spacing, label median HU (with its
    p5-p95 bar) and label volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({r.site for r in rows})
    fig, axes = plt.subplots(1, 4, figsize=(16, 0.5 * len(sites) + 2.2), sharey=True)
    panels = [("slice thickness (mm)", lambda r: r.slice_thickness),
              ("in-plane spacing X (mm)", lambda r: r.spacing[0]),
              ("label intensity p50 (HU), bar p5-p95", lambda r: r.label_percentiles[2]),
              ("label volume (ml)", lambda r: r.label_ml)]
    for ax, (title, value) in zip(axes, panels):
        for y, site in enumerate(sites):
            mine = [r for r in rows if r.site == site]
            xs = [value(r) for r in mine]
            color = "tab:red" if site == source else "tab:blue"
            if title.startswith("label intensity"):
                for r in mine:
                    ax.plot([r.label_percentiles[1], r.label_percentiles[3]], [y, y], color=color, alpha=0.3)
            ax.scatter(xs, [y] * len(xs), color=color, s=18, zorder=3)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(sites)), sites)
    fig.suptitle("Dataset fingerprint per site" + (f" (source {source} in red)" if source else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
