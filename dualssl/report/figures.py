"""Figures of a study from statistics rows (``dualssl.stats``) and per-case rows.

Built on ``matplotlib.figure.Figure`` (no pyplot, no global backend state): each ``*_figure`` returns
a Figure, each ``draw_*`` draws into a given Axes so figures can be composed (``summary_figure``).
Colours are Okabe-Ito (distinguishable with the common colour-vision deficiencies); the reference arm
is black; the heatmap uses viridis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7",
                              "#F0E442", "#999999")
REFERENCE_COLOUR = "#000000"
FAIL_BELOW = 0.5


def arm_colours(arms: Sequence[str], reference: str | None = "plain") -> dict[str, str]:
    """Arm -> colour: the reference black, the others Okabe-Ito in order (cycled past eight)."""
    others = [a for a in arms if a != reference]
    colours = {a: OKABE_ITO[i % len(OKABE_ITO)] for i, a in enumerate(others)}
    if reference in arms:
        colours[reference] = REFERENCE_COLOUR
    return colours


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG (white background) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def metric_label(metric: str) -> str:
    """Display name of a metric column (``hd95`` -> ``HD95 (mm)``)."""
    return {"dice": "Dice", "nsd": "NSD", "jaccard": "Jaccard", "hd95": "HD95 (mm)",
            "asd": "ASD (mm)"}.get(metric, metric)


def draw_strip(ax: Axes, rows: Sequence[Mapping[str, Any]], arms: Sequence[str], sites: Sequence[str],
               colours: Mapping[str, str], metric: str = "dice", seed: int = 0) -> None:
    """Per site, per arm: a box (quartiles, whiskers at 1.5 IQR) over the jittered per-case points."""
    rng = np.random.default_rng(seed)
    width = 0.8 / max(len(arms), 1)
    for j, arm in enumerate(arms):
        for i, site in enumerate(sites):
            v = np.array([float(r[metric]) for r in rows if r["arm"] == arm and r["site"] == site])
            v = v[~np.isnan(v)]
            if v.size == 0:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.boxplot([v], positions=[x], widths=width * 0.8, showfliers=False, patch_artist=True,
                       boxprops=dict(facecolor="none", edgecolor=colours[arm], linewidth=1.2),
                       medianprops=dict(color=colours[arm], linewidth=2),
                       whiskerprops=dict(color=colours[arm]), capprops=dict(color=colours[arm]))
            ax.scatter(x + rng.uniform(-width * 0.3, width * 0.3, v.size), v, s=9, alpha=0.55,
                       color=colours[arm], edgecolors="none", zorder=3)
    if metric in ("dice", "nsd", "jaccard"):
        ax.axhline(FAIL_BELOW, color="#555555", linestyle="--", linewidth=0.9)
        ax.text(1.005, FAIL_BELOW, f"fail\n< {FAIL_BELOW}", transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=8, color="#555555")
        ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(range(len(sites)), sites, rotation=20 if len(sites) > 4 else 0,
                  ha="right" if len(sites) > 4 else "center")
    ax.set_xlim(-0.5, len(sites) - 0.5)
    ax.set_xlabel("unseen test site")
    ax.set_ylabel(f"{metric_label(metric)} per case")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Line2D([], [], color=colours[a], marker="o", linestyle="-", label=a) for a in arms],
              loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, ncols=min(len(arms), 6))


def strip_figure(rows: Sequence[Mapping[str, Any]], arms: Sequence[str], sites: Sequence[str],
                 colours: Mapping[str, str], metric: str = "dice") -> Figure:
    """Per-site box and strip plot per arm (rows: unseen-site cases, pooled over source sites and seeds)."""
    fig = _new_figure(max(5.0, 1.1 * len(sites) * max(1, len(arms)) ** 0.5 + 2), 4.0)
    ax = fig.add_subplot()
    draw_strip(ax, rows, arms, sites, colours, metric)
    ax.set_title(f"{metric_label(metric)} per case on unseen sites (all source sites and seeds)")
    return fig


def draw_forest(ax: Axes, per_site: Sequence[Mapping[str, Any]], pooled: Sequence[Mapping[str, Any]],
                arms: Sequence[str], colours: Mapping[str, str], metric: str = "dice",
                reference: str = "plain") -> None:
    """Arm - reference per site (circles) and pooled over unseen sites (diamonds), 95% CI bars, line at 0."""
    arms = [a for a in arms if a != reference]
    sites = sorted({r["site"] for r in per_site})
    groups = [("all unseen", list(pooled))] + [(s, [r for r in per_site if r["site"] == s]) for s in sites]
    step = 1.0 / (len(arms) + 1)
    labels, ticks = [], []
    for g, (name, rows) in enumerate(groups):
        y0 = -g  # top to bottom
        ticks.append(y0 - step * (len(arms) - 1) / 2)
        labels.append(name)
        for j, arm in enumerate(arms):
            match = [r for r in rows if r["arm"] == arm]
            if not match:
                continue
            r = match[0]
            y = y0 - step * j
            ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]],
                        fmt="D" if g == 0 else "o", markersize=7 if g == 0 else 5, color=colours[arm],
                        capsize=2.5, linewidth=1.5)
        if g == 0 and len(groups) > 1:
            ax.axhline(-0.5 - step * (len(arms) - 1) / 2 + 0.0, color="#bbbbbb", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=1)
    ax.margins(x=0.08)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel(f"Δ {metric_label(metric)}: arm − {reference} (mean of paired differences, 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Line2D([], [], color=colours[a], marker="o", linestyle="-", label=a) for a in arms],
              loc="best", frameon=True)


def forest_figure(per_site: Sequence[Mapping[str, Any]], pooled: Sequence[Mapping[str, Any]],
                  arms: Sequence[str], colours: Mapping[str, str], metric: str = "dice",
                  reference: str = "plain") -> Figure:
    """The paired-difference forest plot (see ``draw_forest``)."""
    n_sites = len({r["site"] for r in per_site}) + 1
    fig = _new_figure(6.5, 1.0 + 0.16 * n_sites * max(1, len(arms) - 1) + 0.15 * n_sites)
    ax = fig.add_subplot()
    draw_forest(ax, per_site, pooled, arms, colours, metric, reference)
    ax.set_title(f"Paired difference to {reference} on unseen sites")
    return fig


def heatmap_figure(site_stats: Sequence[Mapping[str, Any]], arms: Sequence[str], metric: str = "dice") -> Figure:
    """Train x test heatmaps of the mean, one panel per arm: rows = source site, columns = test site.

    Cells of the source site itself (its validation cases) are outlined.
    """
    sources = sorted({r["source_site"] for r in site_stats})
    sites = sorted({r["site"] for r in site_stats})
    ncols = len(arms) if len(arms) <= 3 else math.ceil(math.sqrt(len(arms)))
    nrows = math.ceil(len(arms) / ncols)
    cell = 0.62
    fig = _new_figure(ncols * (cell * len(sites) + 1.6) + 1.0, nrows * (cell * len(sources) + 1.4))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    means = [r["mean"] for r in site_stats if not math.isnan(r["mean"])]
    vmin, vmax = (min(means), max(means)) if means else (0.0, 1.0)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(arms):
            ax.set_visible(False)
            continue
        arm = arms[k]
        grid = np.full((len(sources), len(sites)), np.nan)
        for r in site_stats:
            if r["arm"] == arm:
                grid[sources.index(r["source_site"]), sites.index(r["site"])] = r["mean"]
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(sources)):
            for j in range(len(sites)):
                if not np.isnan(grid[i, j]):
                    shade = (grid[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if shade > 0.55 else "white")
                if sources[i] == sites[j]:
                    ax.add_patch(_outline(j, i))
        ax.set_xticks(range(len(sites)), sites, rotation=40, ha="right")
        ax.set_yticks(range(len(sources)), sources)
        ax.set_title(arm)
        ax.set_xlabel("test site")
        ax.set_ylabel("source (training) site")
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"mean {metric_label(metric)}", shrink=0.8)
    return fig


def _outline(x: float, y: float):
    from matplotlib.patches import Rectangle
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2)


def robustness_figure(sweep_stats: Sequence[Mapping[str, Any]], arms: Sequence[str],
                      colours: Mapping[str, str], metric: str = "dice",
                      base_levels: Mapping[str, float] | None = None) -> Figure:
    """Mean vs severity per shift axis (one panel each), a line per arm with its 95% CI band.

    ``base_levels``: axis -> severity of the base site's own cases (severity 0,
    ``dualssl.data.phantom.sweeps.severity_zero_rows``), marked by a dotted line."""
    axes_names = sorted({r["axis"] for r in sweep_stats})
    fig = _new_figure(min(3.6 * len(axes_names), 12) + 0.5, 3.4 * math.ceil(len(axes_names) / 3))
    axs = fig.subplots(math.ceil(len(axes_names) / 3), min(len(axes_names), 3), squeeze=False, sharey=True)
    for k, ax in enumerate(axs.flat):
        if k >= len(axes_names):
            ax.set_visible(False)
            continue
        name = axes_names[k]
        for arm in arms:
            pts = sorted((r for r in sweep_stats if r["axis"] == name and r["arm"] == arm),
                         key=lambda r: r["severity"])
            if not pts:
                continue
            x = [r["severity"] for r in pts]
            ax.fill_between(x, [r["ci_low"] for r in pts], [r["ci_high"] for r in pts],
                            color=colours[arm], alpha=0.18, linewidth=0)
            ax.plot(x, [r["mean"] for r in pts], marker="o", markersize=4, color=colours[arm], label=arm)
        if base_levels and name in base_levels:
            ax.axvline(base_levels[name], color="0.5", linestyle=":", linewidth=1)
            ax.annotate("base site", (base_levels[name], 0.02), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=7, color="0.4", ha="right", va="bottom")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
        if k % 3 == 0:
            ax.set_ylabel(f"mean {metric_label(metric)} (95% CI)")
    axs.flat[0].legend(loc="lower left")
    return fig


def summary_figure(per_site: Sequence[Mapping[str, Any]], pooled: Sequence[Mapping[str, Any]],
                   rows: Sequence[Mapping[str, Any]], arms: Sequence[str], sites: Sequence[str],
                   colours: Mapping[str, str], metric: str = "dice", reference: str = "plain") -> Figure:
    """README figure: the forest plot (left) beside the per-site strip plot (right); strip only without pairs."""
    fig = _new_figure(11.0 if pooled else 6.0, 4.2)
    if pooled:
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])
        draw_forest(left, per_site, pooled, arms, colours, metric, reference)
        left.set_title(f"Δ to {reference} on unseen sites")
    else:
        right = fig.add_subplot()
    draw_strip(right, rows, arms, sites, colours, metric)
    right.set_title(f"{metric_label(metric)} per case on unseen sites")
    return fig
