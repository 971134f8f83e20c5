"""Severity sweeps of the phantom: each knob changes what it says, measured on the written files.

One sweep dataset (base ``pv_standard`` plus 11 sweep sites, one case each, scale 0.15) is written
once; every sweep site holds the same patients (never the base site's own, which a study trains on), so
the difference of two written sweep images isolates the knob; each axis is compared with its neutral value.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dualssl.cli import main
from dualssl.data.datalist import load_datalist
from dualssl.data.phantom import (SWEEP_AXES, Tissue, generate_dataset, generate_sweep_dataset, get_profile,
                                  sweep_profile, sweep_profiles)
from dualssl.data.verify import verify_dataset

SCALE = 0.15
SWEEPS = {"noise": [0, 10, 40], "hu_offset": [0, 50], "hu_scale": [1.0, 1.25], "slice": [3],
          "pixel": [1.6], "truncation": [250], "cupping": [0, 100], "phase": ["native"]}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    return generate_sweep_dataset(tmp_path_factory.mktemp("sweep") / "ds", SWEEPS, cases_per_site=1, seed=0,
                                  scale=SCALE)


def _load(root: Path, site: str, kind: str = "images") -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(root / f"{kind}Tr" / f"{site}_000.nii.gz"))


def _image(root: Path, site: str) -> np.ndarray:
    return np.asarray(_load(root, site).dataobj, dtype=np.float64)


def _label(root: Path, site: str) -> np.ndarray:
    return np.asarray(_load(root, site, "labels").dataobj)


def _radius_mm(img: nib.Nifti1Image) -> np.ndarray:
    """In-plane distance (mm) of every voxel centre from the scanner axis (world x = y = 0), (X, Y, 1)."""
    nx, ny = img.shape[:2]
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    world = img.affine[:2, :2] @ np.stack([i.ravel(), j.ravel()]) + img.affine[:2, 3:4]
    return np.hypot(world[0], world[1]).reshape(nx, ny, 1)


def test_sweep_patients_are_not_the_base_sites_own(sweep_root):
    # a study trains on the base site: its patients must not come back, noisier, as a test site
    assert not np.array_equal(_label(sweep_root, "sweep-noise-0"), _label(sweep_root, "pv_standard"))
    assert np.array_equal(_label(sweep_root, "sweep-noise-0"), _label(sweep_root, "sweep-hu_scale-1.25"))


def test_dataset_json_lists_every_sweep_site(sweep_root):
    ds = json.loads((sweep_root / "dataset.json").read_text())
    expected = ["pv_standard"] + [f"sweep-{a}-{v:g}" if not isinstance(v, str) else f"sweep-{a}-{v}"
                                  for a, vs in SWEEPS.items() for v in vs]
    assert list(ds["sites"]) == expected
    assert [e["site"] for e in ds["training"]] == expected
    assert set(ds["sweeps"]) == set(expected[1:])
    assert ds["sweeps"]["sweep-noise-40"] == {"axis": "noise", "value": 40.0, "unit": "HU", "base": "pv_standard",
                                              "base_value": [10.0, 12.0]}
    assert ds["sweeps"]["sweep-phase-native"]["value"] == "native"
    assert {c.site for c in load_datalist(sweep_root)} == set(expected)
    assert not [p for p in verify_dataset(sweep_root) if p.fatal]


def test_noise_std_follows_the_noise_value(sweep_root):
    clean = _image(sweep_root, "sweep-noise-0")
    body = clean > -300
    std = {v: float((_image(sweep_root, f"sweep-noise-{v}") - clean)[body].std()) for v in (10, 40)}
    # std = value x body-size factor (0.85-1.2), the same factor at both values
    assert 0.85 * 10 - 0.5 < std[10] < 1.2 * 10 + 0.5
    assert std[40] / std[10] == pytest.approx(4.0, rel=0.02)
    assert np.array_equal(_label(sweep_root, "sweep-noise-40"), _label(sweep_root, "sweep-noise-0"))


def test_hu_offset_shifts_the_stored_values(sweep_root):
    zero, shifted = _image(sweep_root, "sweep-hu_offset-0"), _image(sweep_root, "sweep-hu_offset-50")
    unclipped = (zero > -970) & (zero < 3000)
    diff = (shifted - zero)[unclipped]
    assert diff.mean() == pytest.approx(50.0, abs=0.02)
    assert np.abs(diff - 50).max() <= 1
    assert np.array_equal(_label(sweep_root, "sweep-hu_offset-50"), _label(sweep_root, "sweep-noise-0"))


def test_hu_scale_multiplies_the_stored_values(sweep_root):
    base, scaled = _image(sweep_root, "sweep-hu_scale-1"), _image(sweep_root, "sweep-hu_scale-1.25")
    keep = (base > -700) & (base < 2000)
    slope, _ = np.polyfit(base[keep], scaled[keep], 1)
    assert slope == pytest.approx(1.25, abs=0.002)


def test_slice_and_pixel_set_the_written_spacing(sweep_root):
    base = _load(sweep_root, "sweep-noise-0").header.get_zooms()  # the same patient, the base's acquisition
    thick = _load(sweep_root, "sweep-slice-3").header.get_zooms()
    coarse = _load(sweep_root, "sweep-pixel-1.6").header.get_zooms()
    assert base[2] == pytest.approx(1.0 / SCALE, rel=1e-5)
    assert thick[2] == pytest.approx(3.0 / SCALE, rel=1e-5) and thick[:2] == pytest.approx(base[:2], rel=1e-5)
    assert coarse[0] == coarse[1] == pytest.approx(1.6 / SCALE, rel=1e-5)
    assert coarse[2] == pytest.approx(base[2], rel=1e-5)


def test_cupping_drops_the_centre_by_the_value(sweep_root):
    base_img = _load(sweep_root, "sweep-cupping-0")
    base, cupped = _image(sweep_root, "sweep-cupping-0"), _image(sweep_root, "sweep-cupping-100")
    body = np.broadcast_to(base > -300, base.shape)
    # drop = value x (1 - (r / R)^2), R = half the 500 mm square field of view of pv_standard
    profile = np.broadcast_to(1 - (_radius_mm(base_img) / 250.0) ** 2, base.shape)[body]
    drop = (base - cupped)[body]
    value = float((drop * profile).sum() / (profile * profile).sum())
    assert value == pytest.approx(100.0, abs=1.0)
    assert np.abs(drop - 100 * profile).max() <= 1.5


def test_truncation_cuts_the_field_of_view_to_the_circle(sweep_root):
    base, cut = _load(sweep_root, "pv_standard"), _load(sweep_root, "sweep-truncation-250")
    width = lambda img: np.array(img.shape[:2]) * np.array(img.header.get_zooms()[:2])  # noqa: E731
    assert (width(base) > 255).any()
    assert (width(cut) <= 250 + 2 * cut.header.get_zooms()[0]).all()
    outside = np.broadcast_to(_radius_mm(cut) > 125 + cut.header.get_zooms()[0], cut.shape)
    assert outside.any() and (np.asarray(cut.dataobj)[outside] <= -995).all()


def test_phase_and_geometry_sweeps_keep_the_label_on_the_pancreas(sweep_root):
    medians = {}
    for site in ("pv_standard", "sweep-slice-3", "sweep-pixel-1.6", "sweep-truncation-250", "sweep-phase-native"):
        label = _label(sweep_root, site) > 0
        assert label.sum() > 10, site
        medians[site] = float(np.median(_image(sweep_root, site)[label]))
        lo, hi = get_profile(site).expected_hu(Tissue.PANCREAS)
        # at this scale 3 mm slices are 20 mm thick and 1.6 mm pixels 11 mm wide: partial volume with
        # the fat around the gland lowers the median
        margin = 40 if site in ("sweep-slice-3", "sweep-pixel-1.6") else 15
        assert lo - margin <= medians[site] <= hi, (site, medians[site])
    assert medians["sweep-phase-native"] < medians["pv_standard"] - 25


def test_generation_is_deterministic_from_names_or_profiles(sweep_root, tmp_path):
    again = generate_dataset(tmp_path / "again", sites=["pv_standard", "sweep-noise-40", sweep_profile("slice", 3)],
                             cases_per_site=1, seed=0, scale=SCALE)
    for site in ("pv_standard", "sweep-noise-40", "sweep-slice-3"):
        for kind in ("imagesTr", "labelsTr"):
            name = f"{kind}/{site}_000.nii.gz"
            assert (again / name).read_bytes() == (sweep_root / name).read_bytes(), name


def test_sweep_names_round_trip():
    p = get_profile("sweep-hu_offset--50")
    assert p.hu_offset == (-50.0, -50.0) and p.base == "pv_standard" and p.sweep == ("hu_offset", -50.0)
    other = get_profile("native_thick-sweep-noise-20")
    assert other.base == "native_thick" and other.noise_hu == (20.0, 20.0) and other.phase == "native"
    assert other.seed_site == "native_thick" and get_profile("pv_standard").seed_site == "pv_standard"
    assert list(sweep_profiles("noise", [5, 20, 5])) == ["sweep-noise-5", "sweep-noise-20"]


@pytest.mark.parametrize("call, words", [
    (lambda: sweep_profiles("blur", [1]), ["unknown sweep axis 'blur'", "noise (HU", "truncation (mm"]),
    (lambda: sweep_profiles("noise", [-5]), ["noise=-5", "0 to 300 HU"]),
    (lambda: sweep_profiles("phase", ["venous"]), ["phase='venous'", "native", "portal"]),
    (lambda: sweep_profiles("slice", ["thick"]), ["slice='thick'", "not a number", "mm"]),
    (lambda: get_profile("sweep-pixel-9"), ["pixel=9", "0.3 to 2.5 mm"]),
    (lambda: generate_sweep_dataset("/nonexistent", {}), ["name at least one axis"]),
])
def test_bad_sweeps_name_the_axes_and_units(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for word in words:
        assert word in str(err.value)


def test_every_axis_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PHANTOM.md").read_text()
    for axis in SWEEP_AXES:
        assert f"`{axis}`" in doc, axis


def test_cli_writes_one_site_per_sweep_value(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["phantom", "--out", str(out), "--sweep", "noise=5,20", "--sweep", "phase=native",
               "--cases-per-site", "1", "--scale", "0.1"])
    assert rc == 0
    ds = json.loads((out / "dataset.json").read_text())
    assert list(ds["sites"]) == ["pv_standard", "sweep-noise-5", "sweep-noise-20", "sweep-phase-native"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(
        f"{s}_000.nii.gz" for s in ds["sites"])
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--sweep", "blur=1"]) == 2
    assert "unknown sweep axis 'blur'" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--sweep", "noise"]) == 2
    assert "AXIS=V1,V2" in capsys.readouterr().err


def test_severity_zero_is_the_base_sites_own_cases_of_the_same_cell(tmp_path):
    """A cell's per-case files -> cases.csv rows (studies/shift_table.case_rows): every numeric sweep
    axis gets the base site's own rows at the base's level; the curve starts there."""
    import csv
    import sys

    from dualssl.data.phantom.sweeps import SEVERITY_ZERO_PART, base_level, severity_zero_rows, sweep_record
    from dualssl.stats import read_cases, summarise

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from studies.shift_table import CASE_COLUMNS, case_rows, write_csv

    sweeps = {p.name: sweep_record(p) for p in [*sweep_profiles("noise", [25, 50]).values(),
                                                *sweep_profiles("phase", ["native"]).values()]}
    assert base_level(sweeps["sweep-noise-25"]) == 11.0  # pv_standard's own noise: 10-12 HU
    cases = [("pv_standard", "pv_standard_001", 0.9), ("pv_standard", "pv_standard_004", 0.8),
             ("native_thick", "native_thick_000", 0.5), ("sweep-noise-25", "sweep-noise-25_000", 0.7),
             ("sweep-noise-50", "sweep-noise-50_000", 0.6), ("sweep-phase-native", "sweep-phase-native_000", 0.4)]
    with open(tmp_path / "per_case.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["site", "case_id", "dice"])
        writer.writerows(cases)
    cell = {"study.arm": "plain", "optim.seed": 1, "study.cell": "plain-s1-pv_standard"}
    rows = case_rows(tmp_path, cell, "t1", sweeps, ["pv_standard"])
    zero = [r for r in rows if r["part"] == SEVERITY_ZERO_PART]
    assert [(r["site"], r["axis"], r["severity"], r["dice"], r["role"]) for r in zero] == [
        ("pv_standard", "noise", 11.0, "0.9", "source"), ("pv_standard", "noise", 11.0, "0.8", "source")]
    assert all(r["arm"] == "plain" and r["seed"] == 1 and r["cell"] == "plain-s1-pv_standard" for r in zero)
    assert len(rows) == len(cases) + 2  # the originals are kept as they were
    # through cases.csv and the report's statistics: the noise curve starts at the base (11 HU)
    # (a categorical severity, phase, does not go through read_cases: left out here)
    numeric = [r for r in rows if r["axis"] != "phase"]
    table = read_cases(write_csv(numeric, tmp_path / "cases.csv", CASE_COLUMNS))
    curve = summarise([r for r in table if r["axis"] == "noise"], by=(), n_boot=200)
    assert [(r["severity"], round(r["mean"], 3)) for r in curve] == [(11.0, 0.85), (25.0, 0.7), (50.0, 0.6)]
    # the headline never sees them (sweep rows), and nothing is added without a sweep
    assert severity_zero_rows(rows[:3], {}) == []
