"""The phantom's patient-side options (``PhantomOptions``: field of view and table, the pancreas'
surroundings and fat, presets) and the peri-pancreatic appearance measure they were tuned with."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from dualssl.cli import main as cli_main
from dualssl.data.phantom import PHANTOM_PRESETS, PhantomOptions, phantom_options, render_case
from dualssl.data.phantom.measure import peripancreatic_appearance
from dualssl.data.phantom.tissues import Tissue

SCALE = 0.3
SEEDS = (11, 12)


def _ras(case, array: np.ndarray) -> np.ndarray:
    ornt = ornt_transform(axcodes2ornt(tuple(case.info["orientation"])), axcodes2ornt(tuple("RAS")))
    return apply_orientation(array, ornt)


def _appearance(case) -> dict:
    hu = (case.image.astype(np.float32) - case.info["hu_offset"]) / case.info["hu_scale"]
    return peripancreatic_appearance(hu, case.label, tuple(case.info["spacing_mm"]))


@pytest.fixture(scope="module")
def cases():
    return {seed: {"default": render_case("pv_standard", seed, SCALE),
                   "packed": render_case("pv_standard", seed, SCALE, options=PhantomOptions(context="packed")),
                   "scanner": render_case("pv_standard", seed, SCALE, options=PhantomOptions(fov="scanner")),
                   "lean": render_case("pv_standard", seed, SCALE, options=PhantomOptions(pancreas_fat=0.0))}
            for seed in SEEDS}


def test_appearance_of_a_hand_made_volume():
    # A 4x4x4 pancreas of 100 HU in the middle of a 20^3 grid; left of the midline fat (-100 HU),
    # right of it 50 HU. The ring (3 dilations) is mirror-symmetric about the midline, so half of it
    # is fat and its mean is (-100 + 50) / 2.
    hu = np.full((20, 20, 20), 50.0, np.float32)
    hu[:10] = -100.0
    label = np.zeros(hu.shape, np.uint8)
    label[8:12, 8:12, 8:12] = 1
    hu[label == 1] = 100.0
    hu[9, 9, 9] = 140.0                      # one brighter voxel: mean 100 + 40 / 64
    m = peripancreatic_appearance(hu, label, (3.0, 3.0, 4.0))
    assert m["pancreas_hu_mean"] == pytest.approx(100.0 + 40.0 / 64)
    assert m["pancreas_hu_sd"] == pytest.approx(np.std([100.0] * 63 + [140.0]))
    assert m["ring_fat_fraction"] == pytest.approx(0.5)
    assert m["ring_soft_fraction"] == pytest.approx(0.5)
    assert m["ring_hu_mean"] == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="no pancreas"):
        peripancreatic_appearance(hu, np.zeros_like(label), (3.0, 3.0, 4.0))
    with pytest.raises(ValueError, match="same 3D"):
        peripancreatic_appearance(hu, label[:10], (3.0, 3.0, 4.0))


def test_clinical_preset_is_deterministic_and_its_label_is_the_painted_pancreas():
    case = render_case("pv_standard", 11, SCALE, options="clinical")
    again = render_case("pv_standard", 11, SCALE, options=PHANTOM_PRESETS["clinical"])
    assert np.array_equal(case.image, again.image) and np.array_equal(case.label, again.label)
    # the case records the fields that differ from the defaults, and only those (fov stays "body")
    assert {k: case.info[k] for k in ("coverage", "context", "pancreas_fat")} == \
        {"coverage": "long", "context": "packed", "pancreas_fat": 0.0}
    assert "fov" not in case.info
    on_gland = (case.organs[case.label > 0] == Tissue.PANCREAS).mean()
    assert on_gland > 0.85, f"only {on_gland:.2f} of the label lies on painted pancreas"


def test_scanner_fov_shows_air_and_the_table_under_the_same_patient(cases):
    for seed in SEEDS:
        body, scan = cases[seed]["default"], cases[seed]["scanner"]
        assert scan.image.shape[0] == scan.image.shape[1], "a square reconstruction"
        assert scan.image.shape[0] > max(body.image.shape[:2]), "wider than the body crop"
        assert abs(scan.info["pancreas_ml"] - body.info["pancreas_ml"]) < 0.03 * body.info["pancreas_ml"]
        organs = _ras(scan, scan.organs)
        table = organs == Tissue.TABLE
        assert table.sum() > 0, "the table is in the field of view"
        mid = int(np.mean(np.nonzero((organs == Tissue.SKIN).any(axis=(1, 2)))[0]))   # the body's midline
        skin_y = np.nonzero((organs[mid] == Tissue.SKIN).any(axis=1))[0].min()
        table_y = np.nonzero(table[mid].any(axis=1))[0]
        assert len(table_y) and table_y.max() < skin_y, "under the midline, the table lies behind the back"
        assert (organs == Tissue.AIR).mean() > (_ras(body, body.organs) == Tissue.AIR).mean() + 0.1
        assert "table" in scan.info["tissue_hu"] and "table" not in body.info["tissue_hu"]


def test_packed_context_puts_bowel_against_the_pancreas(cases):
    for seed in SEEDS:
        fat = _appearance(cases[seed]["default"])["ring_fat_fraction"]
        packed = _appearance(cases[seed]["packed"])["ring_fat_fraction"]
        assert packed < fat - 0.05, f"seed {seed}: ring fat {packed:.2f} packed vs {fat:.2f} default"
        assert abs(cases[seed]["packed"].info["pancreas_ml"] - cases[seed]["default"].info["pancreas_ml"]) \
            < 0.05 * cases[seed]["default"].info["pancreas_ml"]


def test_lean_pancreas_has_no_interlobular_fat(cases):
    for seed in SEEDS:
        default, lean = cases[seed]["default"], cases[seed]["lean"]
        assert default.info["pancreas_fat_fraction"] > 0 and lean.info["pancreas_fat_fraction"] == 0.0
        assert np.array_equal(default.label, lean.label), "only the gland's texture changes"
        gland = default.organs == Tissue.PANCREAS
        # the fat fraction of the gland turned from fat back into pancreas: the mean rises by about
        # fraction x (pancreas HU - fat HU) (blur and partial volume take a little of it)
        hu = default.info["tissue_hu"]
        expected = default.info["pancreas_fat_fraction"] * (hu["pancreas"] - hu["visceral_fat"]) * default.info["hu_scale"]
        rise = lean.image[gland].astype(float).mean() - default.image[gland].astype(float).mean()
        assert 0.6 * expected < rise < 1.2 * expected, f"seed {seed}: mean rose {rise:.1f}, expected ~{expected:.1f}"


def test_options_are_validated_by_field_and_presets_take_overrides():
    assert phantom_options("clinical", fov="scanner", context=None) == PhantomOptions(
        coverage="long", fov="scanner", context="packed", pancreas_fat=0.0)
    assert phantom_options(None) == PhantomOptions() and PhantomOptions().changes() == {}
    for kwargs, message in (({"fov": "wide"}, "fov='wide'.*body, scanner"),
                            ({"context": "loose"}, "context='loose'.*fat, packed"),
                            ({"pancreas_fat": -1}, r"pancreas_fat=-1.*\[0, 3\]"),
                            ({"coverage": "pelvis"}, "coverage='pelvis'")):
        with pytest.raises(ValueError, match=message):
            PhantomOptions(**kwargs)
    with pytest.raises(ValueError, match="preset 'real'.*default, clinical"):
        phantom_options("real")
    with pytest.raises(ValueError, match="unknown field.*zoom"):
        phantom_options("default", zoom=2)


def test_cli_preset_with_an_override_is_recorded(tmp_path, capsys):
    out = tmp_path / "p"
    assert cli_main(["phantom", "--out", str(out), "--sites", "native_thick", "--cases-per-site", "1",
                     "--scale", "0.2", "--preset", "clinical", "--fov", "scanner", "--context", "fat"]) == 0
    phantom = json.loads((out / "dataset.json").read_text())["phantom"]
    assert {k: phantom.get(k) for k in ("coverage", "fov", "context", "pancreas_fat")} == \
        {"coverage": "long", "fov": "scanner", "context": None, "pancreas_fat": 0.0}
    assert cli_main(["phantom", "--out", str(tmp_path / "q"), "--context", "loose"]) != 0
    assert "context='loose': choose one of fat, packed" in capsys.readouterr().err
    assert not (tmp_path / "q").exists(), "a bad option is refused before any folder is written"
