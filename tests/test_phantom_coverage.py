"""The phantom's cranio-caudal coverage: the abdominal crop (default) and the long scan (lung bases to
iliac crests) that a clinical abdominal CT such as NIH Pancreas-CT covers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from dualssl.cli import main as cli_main
from dualssl.data.phantom import PhantomOptions, render_case
from dualssl.data.phantom.tissues import Tissue

SCALE = 0.3


def _ras(case, array: np.ndarray) -> np.ndarray:
    ornt = ornt_transform(axcodes2ornt(tuple(case.info["orientation"])), axcodes2ornt(tuple("RAS")))
    return apply_orientation(array, ornt)


@pytest.fixture(scope="module")
def pair():
    return (render_case("pv_standard", 11, SCALE),
            render_case("pv_standard", 11, SCALE, options=PhantomOptions(coverage="long")))


def test_long_coverage_is_deterministic_and_its_label_is_the_painted_pancreas(pair):
    _, long = pair
    again = render_case("pv_standard", 11, SCALE, options=PhantomOptions(coverage="long"))
    assert np.array_equal(long.image, again.image) and np.array_equal(long.label, again.label)
    assert long.info["coverage"] == "long"
    on_gland = (long.organs[long.label > 0] == Tissue.PANCREAS).mean()
    assert on_gland > 0.85, f"only {on_gland:.2f} of the label lies on painted pancreas"


def test_long_coverage_adds_thorax_and_pelvis_and_keeps_the_patient(pair):
    short, long = pair
    dz = long.info["spacing_mm"][2]
    extra_mm = (long.image.shape[2] - short.image.shape[2]) * dz
    assert 80 <= extra_mm <= 110, f"the long crop adds {extra_mm} mm (expected 95 mm x the case's 0.9-1.1 scale)"
    # the same patient: pancreas volume within 3 % (only the grid's origin moved)
    assert abs(long.info["pancreas_ml"] - short.info["pancreas_ml"]) < 0.03 * short.info["pancreas_ml"]
    organs = _ras(long, long.organs)
    top, bottom = organs[:, :, -3:], organs[:, :, :3]
    body_top = (top != Tissue.AIR).sum()
    assert (top == Tissue.LUNG).sum() > 0.2 * body_top, "the top slices show lung"
    blood_per_slice = (top == Tissue.AORTA).sum() / top.shape[2]
    assert blood_per_slice > 2 * (organs[:, :, organs.shape[2] // 2] == Tissue.AORTA).sum(), \
        "the top slices show the heart's blood pool besides the aorta"
    x_mm = (np.arange(organs.shape[0]) - organs.shape[0] / 2) * long.info["spacing_mm"][0]
    lateral = np.abs(x_mm)[:, None, None] > 45                    # away from the spine: iliac wings
    assert ((bottom == Tissue.CORTICAL_BONE) & lateral).sum() > 20, "the bottom slices show the iliac wings"
    short_organs = _ras(short, short.organs)
    assert (short_organs == Tissue.LUNG).sum() < 0.4 * (organs == Tissue.LUNG).sum(), "the long crop holds the lung bases"


def test_unknown_coverage_is_refused_by_name():
    with pytest.raises(ValueError, match="coverage='pelvis'.*abdomen, long"):
        render_case("pv_standard", 1, SCALE, options=PhantomOptions(coverage="pelvis"))


def test_cli_writes_a_long_dataset_and_records_its_coverage(tmp_path):
    out = tmp_path / "p"
    assert cli_main(["phantom", "--out", str(out), "--sites", "native_thick", "--cases-per-site", "1",
                     "--scale", "0.2", "--coverage", "long"]) == 0
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["phantom"]["coverage"] == "long"
    cases = json.loads((out / "phantom_cases.json").read_text())
    assert cases[0]["coverage"] == "long"
