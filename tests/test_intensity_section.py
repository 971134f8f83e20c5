"""The report's intensity explanation, on hand-computed numbers and on a real nnU-Net plan of the phantom."""

from __future__ import annotations

import pytest

from dualssl.report.intensity_section import brightness_reach, intensity_rows, intensity_section, share_below

NNUNET = {"mean": 70.0, "std": 32.0, "percentile_00_5": -36.0, "percentile_99_5": 129.0}
SITES = {
    "pv": {"foreground_percentiles": {"p0.5": -30.0, "p5": 10.0, "p50": 77.0, "p95": 111.0, "p99.5": 125.0}},
    "native": {"foreground_percentiles": {"p0.5": -50.0, "p5": -43.0, "p50": 15.0, "p95": 47.0, "p99.5": 60.0}},
    "mild": {"foreground_percentiles": {"p0.5": -20.0, "p5": 0.0, "p50": 40.0, "p95": 80.0, "p99.5": 90.0}},
    "cone": {"foreground_percentiles": {"p0.5": -300.0, "p5": -266.0, "p50": -176.0, "p95": -98.0, "p99.5": -60.0}},
}


def test_share_below_reads_the_percentile_line_by_hand():
    # -36 lies between p5 = -43 (5 %) and p50 = 15 (50 %): 5 % + 7/58 x 45 % = 10.4 %
    share, text = share_below(SITES["native"]["foreground_percentiles"], -36.0)
    assert share == pytest.approx(0.05 + 7 / 58 * 0.45) and text == "10 %"
    assert share_below(SITES["pv"]["foreground_percentiles"], -36.0) == (0.0, "< 0.5 %")
    assert share_below(SITES["cone"]["foreground_percentiles"], -36.0) == (1.0, "> 99.5 %")


def test_brightness_about_the_foreground_mean_hardly_moves_the_pancreas():
    assert brightness_reach(77.0, 70.0) == pytest.approx((75.25, 78.75))  # nnU-Net: zero at the mean
    assert brightness_reach(77.0, -100.0) == pytest.approx((32.75, 121.25))  # dualssl: zero at the window floor


def test_rows_say_which_site_lies_outside_each_pipelines_reach():
    rows = {r["site"]: r for r in intensity_rows(SITES, "pv", NNUNET, (-100.0, 240.0))}
    assert rows["pv"]["nnunet_reached"] and rows["pv"]["ours_reached"]
    assert rows["native"]["nnunet_z_median"] == pytest.approx((15 - 70) / 32)
    assert rows["native"]["ours_median"] == pytest.approx(115 / 340)
    assert not rows["native"]["nnunet_reached"] and not rows["native"]["ours_reached"]  # 15 < 32.75
    assert not rows["mild"]["nnunet_reached"] and rows["mild"]["ours_reached"]  # 40 in [32.75, 121.25]
    # the cone-beam pancreas is wholly below nnU-Net's floor: clipped to z = (-36 - 70) / 32
    assert rows["cone"]["nnunet_z_median"] == pytest.approx(-106 / 32)
    assert rows["cone"]["nnunet_clipped_low_text"] == "> 99.5 %" and rows["cone"]["ours_clipped_low_text"] == "94 %"  # 50 % + 76/78 x 45 %
    section = intensity_section(list(rows.values()), NNUNET, (-100.0, 240.0), "pv")
    native = next(r for r in section.table.rows if r[0] == "native")
    assert native[3] == "10 %" and native[-1] == "no / no" and native[-2] == "yes"  # 15 HU in [10, 111]
    assert native[2] == f"{(-36 - 70) / 32:+.2f} / {(15 - 70) / 32:+.2f} / {(47 - 70) / 32:+.2f}"  # p5 clipped
    cone = next(r for r in section.table.rows if r[0] == "cone")
    assert cone[-2] == "NO"
    assert "between 75 and 79 HU" in section.text and "between 33 and 121 HU" in section.text


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="source site 'x'"):
        intensity_rows(SITES, "x", NNUNET, (-100.0, 240.0))
