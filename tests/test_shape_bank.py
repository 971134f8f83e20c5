"""The phantom's shape bank: real pancreas masks (MSD Task07) deformed and placed in the anatomy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualssl.data.phantom import generate_dataset, render_case
from dualssl.data.phantom.shape_bank import ShapeBank
from dualssl.data.phantom.tissues import Tissue

SCALE = 0.3


@pytest.fixture(scope="module")
def bank(shared_data) -> ShapeBank:
    folder = shared_data / "labels" / "msd_task07_pancreas"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return ShapeBank(folder)


def test_bank_refuses_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        ShapeBank(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .nii"):
        ShapeBank(tmp_path)


def test_bank_case_is_deterministic_and_differs_from_the_procedural_gland(bank):
    a = render_case("pv_standard", 5, SCALE, shape_bank=bank)
    b = render_case("pv_standard", 5, SCALE, shape_bank=bank.folder)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.info["pancreas_shape"] == b.info["pancreas_shape"]
    assert a.info["pancreas_shape"].startswith("bank:pancreas_")
    procedural = render_case("pv_standard", 5, SCALE)
    assert "pancreas_shape" not in procedural.info
    assert not np.array_equal(a.label, procedural.label)


@pytest.mark.parametrize("site, seed", [("pv_standard", 1), ("native_thick", 2), ("pv_standard", 3)])
def test_label_stays_on_the_pancreas_and_keeps_the_bank_volume(bank, site, seed):
    case = render_case(site, seed, SCALE, shape_bank=bank)
    label = case.label > 0
    assert label.any()
    # the label is the pancreas of the organ map (partial volume at the rim aside)
    assert np.mean(case.organs[label] == Tissue.PANCREAS) > 0.85
    # and the image there reads the pancreas' CT number (stored = scale * HU + offset)
    true_hu = case.info["tissue_hu"]["pancreas"] * case.info["hu_scale"] + case.info["hu_offset"]
    core = label & case.pure & (case.organs == Tissue.PANCREAS)
    assert abs(float(np.median(case.image[core])) - true_hu) < 25
    # the placed, deformed mask keeps the bank mask's volume within 10 %
    ratio = case.info["pancreas_ml"] / case.info["pancreas_bank_ml"]
    assert 0.9 <= ratio <= 1.1, (case.info["pancreas_shape"], ratio)


def test_generate_dataset_records_the_bank(bank, tmp_path):
    root = generate_dataset(tmp_path / "d", sites=["legacy_5mm"], cases_per_site=1, scale=0.2, shape_bank=bank.folder)
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["phantom"]["shape_bank"] == str(bank.folder)
    infos = json.loads((root / "phantom_cases.json").read_text())
    assert infos[0]["pancreas_shape"].startswith("bank:")
