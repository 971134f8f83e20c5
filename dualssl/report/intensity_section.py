"""Where each site's pancreas falls in nnU-Net's CT normalisation and in ours, and what brightness
augmentation can reach: the report's explanation of an intensity-shift failure.

nnU-Net v2's ``CTNormalization`` clips every scan to the 0.5th and 99.5th percentiles of the source
cases' foreground (here the pancreas) and z-scores it with the foreground mean and std; its
``MultiplicativeBrightnessTransform`` (0.75-1.25, p 0.15) then multiplies the z-scored values, whose
zero IS the foreground mean: the pancreas, near z = 0, hardly moves. dualssl windows HU to
``data.hu_window`` and scales to [0, 1] (zero at the window's floor, e.g. -100 HU), so the same
multiplicative brightness (``RandScaleIntensityd`` 0.75-1.25) moves a 77 HU pancreas between 32 and
121 HU. A site whose pancreas median lies outside what augmentation showed the network, or whose
pancreas is largely clipped away, is an intensity shift the pipeline was not trained for.

Inputs are the study's own numbers: the source cells' nnU-Net plans (``foreground_intensity_properties_per_channel``)
and each site's pooled foreground percentiles from the dataset fingerprint (``dualssl.data.fingerprint``).
Nothing is resampled or fitted: the shares below a clip bound are read off the piecewise-linear
distribution through the fingerprint's percentiles (0.5, 5, 50, 95, 99.5), so they are approximate
between those points and given as "< 0.5 %" / "> 99.5 %" beyond them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dualssl.report.document import Section, Table

BRIGHTNESS = (0.75, 1.25)
"""Multiplicative brightness range of both pipelines (nnU-Net's default trainer; dualssl.data.transforms)."""
PERCENTILE_KEYS = ("p0.5", "p5", "p50", "p95", "p99.5")


def share_below(percentiles: Mapping[str, float], value: float) -> tuple[float, str]:
    """Share of voxels below ``value`` from a site's pooled percentiles -> (share, text).

    Piecewise-linear between the known percentiles; below p0.5 the share is "< 0.5 %", above p99.5 "> 99.5 %".
    """
    qs = np.array([0.005, 0.05, 0.5, 0.95, 0.995])
    xs = np.array([float(percentiles[k]) for k in PERCENTILE_KEYS])
    if value <= xs[0]:
        return 0.0, "< 0.5 %"
    if value >= xs[-1]:
        return 1.0, "> 99.5 %"
    share = float(np.interp(value, xs, qs))
    return share, f"{100 * share:.0f} %"


def brightness_reach(median_hu: float, zero_hu: float, factors: Sequence[float] = BRIGHTNESS) -> tuple[float, float]:
    """HU range a tissue of ``median_hu`` reaches under multiplicative brightness about ``zero_hu``."""
    lo, hi = (zero_hu + (median_hu - zero_hu) * f for f in factors)
    return (min(lo, hi), max(lo, hi))


def intensity_rows(sites: Mapping[str, Mapping[str, Any]], source: str, nnunet: Mapping[str, float],
                   hu_window: Sequence[float]) -> list[dict[str, Any]]:
    """One row per site: its pancreas in HU, in nnU-Net's and dualssl's normalised units, clipped shares,
    and whether its median lies inside what each pipeline's brightness augmentation reached from the source.

    Args:
        sites: fingerprint summary per site (``summarise_sites``): ``foreground_percentiles`` with keys
            ``p0.5 .. p99.5`` in HU.
        source: the source site (its pancreas median is what augmentation moves).
        nnunet: nnU-Net's ``foreground_intensity_properties_per_channel["0"]`` (``mean``, ``std``,
            ``percentile_00_5``, ``percentile_99_5``) fitted on the source cases.
        hu_window: dualssl's ``data.hu_window`` (low, high).
    """
    if source not in sites:
        raise ValueError(f"source site {source!r} has no fingerprint (sites: {', '.join(sites)})")
    mean, std = float(nnunet["mean"]), max(float(nnunet["std"]), 1e-8)
    clip_lo, clip_hi = float(nnunet["percentile_00_5"]), float(nnunet["percentile_99_5"])
    w_lo, w_hi = float(hu_window[0]), float(hu_window[1])
    src_median = float(sites[source]["foreground_percentiles"]["p50"])
    nn_reach = brightness_reach(src_median, mean)
    our_reach = brightness_reach(src_median, w_lo)
    rows = []
    for site, summary in sites.items():
        pct = summary["foreground_percentiles"]
        median = float(pct["p50"])
        below_nn, below_nn_text = share_below(pct, clip_lo)
        above_nn, _ = share_below(pct, clip_hi)
        below_ours, below_ours_text = share_below(pct, w_lo)
        z5, z50, z95 = ((min(max(float(pct[k]), clip_lo), clip_hi) - mean) / std for k in ("p5", "p50", "p95"))
        rows.append({
            "site": site, "source": site == source, "p5": float(pct["p5"]), "p50": median, "p95": float(pct["p95"]),
            "nnunet_z": (z5, z50, z95), "nnunet_z_median": z50,
            "nnunet_clipped_low": below_nn, "nnunet_clipped_low_text": below_nn_text,
            "nnunet_clipped_high": 1.0 - above_nn,
            "ours_median": (min(max(median, w_lo), w_hi) - w_lo) / (w_hi - w_lo),
            "ours_clipped_low": below_ours, "ours_clipped_low_text": below_ours_text,
            "nnunet_reached": nn_reach[0] <= median <= nn_reach[1],
            "ours_reached": our_reach[0] <= median <= our_reach[1],
        })
    return rows


def intensity_section(rows: Sequence[Mapping[str, Any]], nnunet: Mapping[str, float], hu_window: Sequence[float],
                      source: str) -> Section:
    """The report section: a table per site and the rule that explains it."""
    src = next(r for r in rows if r["site"] == source)
    mean, std = float(nnunet["mean"]), float(nnunet["std"])
    nn_reach = brightness_reach(src["p50"], mean)
    our_reach = brightness_reach(src["p50"], float(hu_window[0]))
    table = Table(
        ["site", "pancreas HU p5 / p50 / p95", "nnU-Net z p5 / p50 / p95", "below nnU-Net's clip floor",
         "dualssl [0,1] of median", "below dualssl's window", "median inside the source's p5-p95",
         "median within brightness reach (nnU-Net / dualssl)"],
        [[r["site"] + (" (source)" if r["source"] else ""), f"{r['p5']:.0f} / {r['p50']:.0f} / {r['p95']:.0f}",
          " / ".join(f"{z:+.2f}" for z in r["nnunet_z"]), r["nnunet_clipped_low_text"],
          f"{r['ours_median']:.2f}", r["ours_clipped_low_text"],
          "yes" if src["p5"] <= r["p50"] <= src["p95"] else "NO",
          f"{'yes' if r['nnunet_reached'] else 'no'} / {'yes' if r['ours_reached'] else 'no'}"]
         for r in rows])
    text = (
        f"nnU-Net's CT normalisation was fitted on the source ({source}) pancreas: clip to "
        f"[{nnunet['percentile_00_5']:.0f}, {nnunet['percentile_99_5']:.0f}] HU, then (HU - {mean:.0f}) / {std:.0f}. "
        f"Its multiplicative brightness augmentation ({BRIGHTNESS[0]}-{BRIGHTNESS[1]}) scales z-scores about that "
        f"mean, so the source pancreas median ({src['p50']:.0f} HU) is only ever shown between {nn_reach[0]:.0f} and "
        f"{nn_reach[1]:.0f} HU; dualssl's window [{hu_window[0]:g}, {hu_window[1]:g}] HU scales about its floor, "
        f"which moves it between {our_reach[0]:.0f} and {our_reach[1]:.0f} HU (contrast, gamma and noise "
        "augmentation widen both). A site whose pancreas falls largely below the clip floor is flattened to "
        "one value, like fat; one whose median lies outside the source pancreas's own p5-p95 and outside the "
        "brightness reach shows the network a pancreas intensity it never trained on. These are facts about "
        "the inputs, not a proof of the cause: benchmarks/intensity_probe.py tests it by shifting a site's "
        "HU onto the source's and predicting again; geometry (slice thickness, orientation) is the other "
        "candidate (fingerprint section). Shares below a bound are read off the fingerprint's percentiles "
        "(approximate between them).")
    return Section("Intensity: where each site's pancreas falls in nnU-Net's normalisation and in dualssl's", text,
                   table)
