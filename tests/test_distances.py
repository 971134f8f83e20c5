"""Distances that do not reward misses: ``hd95_penalised`` / ``asd_penalised`` on hand-made masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dualssl.evaluation.metrics import (PENALISED, SITE_KEYS, case_metrics, missed_distance_mm, penalised_distances,
                                        summarise)


def _cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_missed_distance_is_the_diagonal_of_the_image_extent():
    # 10 x 20 x 5 voxels of 1 x 0.5 x 4 mm: 10 x 10 x 20 mm, diagonal sqrt(100 + 100 + 400)
    assert missed_distance_mm((10, 20, 5), (1.0, 0.5, 4.0)) == pytest.approx(math.sqrt(600.0))
    assert missed_distance_mm((1, 10, 20, 5), (1.0, 0.5, 4.0)) == pytest.approx(math.sqrt(600.0))


def test_an_empty_prediction_scores_the_worst_distance_not_nan():
    shape, spacing = (16, 16, 8), (1.0, 1.0, 2.5)
    label = _cube(shape, (4, 4, 2), (9, 9, 5))
    missed = case_metrics(np.zeros(shape, bool), label, spacing)
    assert math.isnan(missed["hd95"]) and math.isnan(missed["asd"])
    worst = math.sqrt(16 ** 2 + 16 ** 2 + 20 ** 2)
    assert penalised_distances(missed, shape, spacing) == pytest.approx({"hd95_penalised": worst, "asd_penalised": worst})
    # a spurious prediction (empty label) is penalised the same way
    spurious = case_metrics(label, np.zeros(shape, bool), spacing)
    assert penalised_distances(spurious, shape, spacing)["hd95_penalised"] == pytest.approx(worst)
    # a found case keeps its own distances; both empty: 0
    shifted = _cube(shape, (5, 4, 2), (10, 9, 5))
    found = case_metrics(shifted, label, spacing)
    assert penalised_distances(found, shape, spacing) == {"hd95_penalised": found["hd95"], "asd_penalised": found["asd"]}
    assert found["hd95"] == pytest.approx(1.0)
    empty = case_metrics(np.zeros(shape, bool), np.zeros(shape, bool), spacing)
    assert penalised_distances(empty, shape, spacing) == {"hd95_penalised": 0.0, "asd_penalised": 0.0}


def test_site_means_of_the_penalised_distance_count_the_misses():
    """Two arms: A finds both cases at 4 mm; B finds the easy one at 2 mm and misses the hard one. Plain
    HD95 ranks B first (2 < 4, the miss left out); the penalised mean ranks A first."""
    worst = 100.0

    def row(case, hd95, missed=False):
        pen = worst if missed else hd95
        return {"case_id": case, "site": "s", "dice": 0.0 if missed else 0.8, "jaccard": 0.5, "nsd": 0.5,
                "hd95": math.nan if missed else hd95, "asd": math.nan if missed else hd95 / 2,
                "hd95_penalised": pen, "asd_penalised": worst if missed else hd95 / 2,
                "empty_pred": missed, "empty_label": False}

    a = summarise([row("easy", 4.0), row("hard", 4.0)], ["src"])["per_site"]["s"]
    b = summarise([row("easy", 2.0), row("hard", 0.0, missed=True)], ["src"])["per_site"]["s"]
    assert b["hd95_mean"] < a["hd95_mean"] and b["n_missed"] == 1 and a["n_missed"] == 0
    assert a["hd95_penalised_mean"] == pytest.approx(4.0) and b["hd95_penalised_mean"] == pytest.approx(51.0)
    assert {f"{name}_mean" for name in PENALISED} <= set(SITE_KEYS) and "n_missed" in SITE_KEYS
    # rows without the penalised columns (an older per_case.csv) still summarise, with NaN there
    old = {k: v for k, v in row("easy", 3.0).items() if k not in PENALISED}
    assert math.isnan(summarise([old], ["src"])["per_site"]["s"]["hd95_penalised_mean"])
