"""Fingerprint and ``--plan auto`` on a hand-made dataset whose numbers are known by construction.

Site ``thick`` (5 cases, RAS int16 at 0.8 x 0.8 x 5.0 mm, one case at 2.5 mm slices): air -1000 HU,
body 0 HU, a 5x5x4 label box whose 100 voxels take the values 50..149 HU once each.
Site ``iso`` (2 cases, float32 stored with voxel axes (S, L, P) at 2.0 / 1.0 / 1.0 mm): body 40 HU,
label values 150..249 HU.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from dualssl.cli import main
from dualssl.config import Config
from dualssl.data.datalist import Case, DatasetError, load_datalist
from dualssl.data.fingerprint import case_fingerprint, fingerprint_cases, site_differences, summarise_sites
from dualssl.data.plan import estimated_memory_gb, plan_from_fingerprint

THICK_Z = [5.0, 5.0, 2.5, 5.0, 5.0]


def _case(folder, name, spacing_ras, shape_ras, tissue, label_values, *, permuted=False, dtype=np.int16):
    """One scan: air, a body box of ``tissue`` HU and a 5x5x4 label box holding ``label_values``."""
    image = np.full(shape_ras, -1000, dtype=np.float32)
    image[4:-4, 4:-4, 1:-1] = tissue
    label = np.zeros(shape_ras, dtype=np.uint8)
    box = (slice(10, 15), slice(10, 15), slice(2, 6))
    image[box] = np.asarray(label_values, dtype=np.float32).reshape(5, 5, 4)
    label[box] = 1
    affine = np.diag([*spacing_ras, 1.0])
    if permuted:  # voxel axes (S, L, P): voxel i runs along world Z, j along -X, k along -Y
        image, label = image.transpose(2, 0, 1), label.transpose(2, 0, 1)
        affine = np.zeros((4, 4))
        affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = spacing_ras[2], -spacing_ras[0], -spacing_ras[1], 1
    nib.save(nib.Nifti1Image(image.astype(dtype), affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_seg.nii.gz")
    return f"{folder / name}.nii.gz,{folder / name}_seg.nii.gz"


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("handmade")
    rows = []
    for i, z in enumerate(THICK_Z):
        depth = int(round(60 / z))  # 60 mm of coverage whatever the slice thickness
        rows.append(_case(folder, f"thick{i}", (0.8, 0.8, z), (40, 40, depth), 0, range(50, 150)) + ",thick")
    for i in range(2):
        rows.append(_case(folder, f"iso{i}", (1.0, 1.0, 2.0), (32, 32, 16), 40, range(150, 250), permuted=True,
                          dtype=np.float32) + ",iso")
    listing = folder / "cases.csv"
    listing.write_text("image,label,site\n" + "\n".join(rows) + "\n")
    return listing


def test_fingerprint_gives_the_numbers_the_dataset_was_made_with(handmade):
    rows = fingerprint_cases(load_datalist(handmade), workers=2)
    summary = summarise_sites(rows)
    thick, iso = summary["thick"], summary["iso"]
    assert thick["count"] == 5 and iso["count"] == 2
    assert [d["median"] for d in thick["spacing"]] == pytest.approx([0.8, 0.8, 5.0])
    assert thick["slice_thickness"]["min"] == pytest.approx(2.5)
    # the permuted site is reported in RAS order: (X, Y, Z) = (1, 1, 2) mm and shape (32, 32, 16)
    assert [d["median"] for d in iso["spacing"]] == pytest.approx([1.0, 1.0, 2.0])
    assert [d["median"] for d in iso["shape"]] == [32, 32, 16]
    assert thick["orientation"] == {"RAS": 5} and iso["orientation"] == {"SLP": 2}
    assert thick["dtype"] == {"int16": 5} and iso["dtype"] == {"float32": 2}
    # label voxels 50..149 once each per case, pooled over 5 cases: p0.5 = 50, p50 = 99.5, p99.5 = 149
    fg = thick["foreground_percentiles"]
    assert (fg["p0.5"], fg["p50"], fg["p99.5"]) == pytest.approx((50.0, 99.5, 149.0))
    assert iso["foreground_percentiles"]["p50"] == pytest.approx(199.5)
    assert thick["body_percentiles"]["p50"] == pytest.approx(0.0) and iso["body_percentiles"]["p50"] == pytest.approx(40.0)
    # 100 label voxels: 0.32 ml at 0.8 x 0.8 x 5 mm, 0.16 ml at 2.5 mm slices, 0.2 ml at 1 x 1 x 2 mm
    assert sorted(r.label_ml for r in rows if r.site == "thick") == pytest.approx([0.16, 0.32, 0.32, 0.32, 0.32])
    assert iso["label_ml"]["median"] == pytest.approx(0.2)

    notes = " | ".join(site_differences(summary, "thick")["iso"])
    for expected in ("in-plane spacing X 1.00 mm vs 0.80 mm", "slice thickness 2.00 mm vs 5.00 mm",
                     "orientation SLP vs RAS", "dtype float32 vs int16", "label median intensity 200 HU vs 100 HU",
                     "body median intensity 40 HU vs 0 HU", "label volume 0.2 ml vs 0.3 ml"):
        assert expected in notes


def test_plan_auto_follows_the_documented_rule(handmade):
    rows = fingerprint_cases(load_datalist(handmade))
    cfg = Config()
    cfg.data.source_sites = ["thick"]
    plan = plan_from_fingerprint(rows, cfg, memory_gb=1000.0)
    # median (0.8, 0.8, 5.0): 5.0 / 0.8 > 3, so Z takes the 10th percentile of [2.5, 5, 5, 5, 5] = 3.5 mm
    assert plan.spacing == pytest.approx((0.8, 0.8, 3.5))
    assert plan.hu_window == (50.0, 149.0)  # foreground p0.5 / p99.5
    # median extent 32 x 32 x 60 mm -> 40 x 40 x 17.1 voxels at the target -> multiples of 8
    assert plan.patch_size == (40, 40, 16)
    assert any("10th percentile" in r for r in plan.reasons)
    # a budget that fits 32 x 32 x 16 only: Z cannot shrink below 16, so Y (the later of the tied
    # longest axes, 32 mm) goes first, then X
    tight = plan_from_fingerprint(rows, cfg, memory_gb=estimated_memory_gb((32, 32, 16), cfg))
    assert tight.patch_size == (32, 32, 16)
    assert plan_from_fingerprint(rows, cfg, memory_gb=estimated_memory_gb((40, 32, 16), cfg)).patch_size == (40, 32, 16)
    with pytest.raises(DatasetError, match="plan-memory-gb"):
        plan_from_fingerprint(rows, cfg, memory_gb=estimated_memory_gb((16, 16, 16), cfg) * 0.99)
    # isotropic site: plain medians
    cfg.data.source_sites = ["iso"]
    assert plan_from_fingerprint(rows, cfg, memory_gb=1000.0).spacing == pytest.approx((1.0, 1.0, 2.0))


def test_fingerprint_of_a_corrupt_scan_names_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(DatasetError, match="bad.nii.gz"):
        case_fingerprint(Case("bad", str(bad), str(bad), "a"))


def test_cli_fingerprint_and_train_plan_auto(handmade, tmp_path, capsys):
    out = tmp_path / "fp"
    assert main(["fingerprint", str(handmade), "--source", "thick", "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "iso: " in text and "slice thickness 2.00 mm vs 5.00 mm" in text
    data = json.loads((out / "fingerprint.json").read_text())
    assert set(data["sites"]) == {"thick", "iso"} and len(data["cases"]) == 7
    assert (out / "fingerprint.csv").read_text().count("\n") == 8 and (out / "fingerprint.png").stat().st_size > 0

    run = tmp_path / "run"
    argv = ["train", "--data", str(handmade), "--source", "thick", "--out", str(run), "--plan", "auto",
            "--plan-memory-gb", "1000", "--set", "optim.epochs=1", "--set", "optim.steps_per_epoch=1",
            "--set", "model.widths=8,16,32,64", "--set", "data.batch_size=1", "--set", "data.samples_per_volume=1",
            "--set", "data.val_fraction=0.4", "--set", "eval.sw_batch_size=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "10th percentile" in printed and "HU window [50, 149]" in printed
    saved = Config.load(run / "config.yaml")
    assert tuple(saved.data.spacing) == pytest.approx((0.8, 0.8, 3.5)) and tuple(saved.data.hu_window) == (50.0, 149.0)
    assert json.loads((run / "plan.json").read_text())["patch_size"] == list(saved.data.patch_size)


def test_plan_auto_plans_each_source_site_of_a_leave_one_site_out_study_from_its_own_cases(handmade):
    """A cell trains on one source site: it gets that site's plan, not the first source's."""
    from dualssl.data.plan import plans_per_source
    from studies.preprocess import DataPass

    rows = fingerprint_cases(load_datalist(handmade))
    plans = plans_per_source(rows, Config(), [["thick"], ["iso"], ["thick"]], memory_gb=1000.0)
    assert list(plans) == ["thick", "iso"]
    assert plans["thick"].spacing == pytest.approx((0.8, 0.8, 3.5)) and plans["thick"].hu_window == (50.0, 149.0)
    assert plans["iso"].spacing == pytest.approx((1.0, 1.0, 2.0)) and plans["iso"].hu_window == (150.0, 249.0)
    passed = DataPass(plans={k: p.to_json() for k, p in plans.items()})
    assert passed.cell_overrides(["iso"]) == {"data.spacing": pytest.approx([1.0, 1.0, 2.0]),
                                              "data.hu_window": [150.0, 249.0],
                                              "data.patch_size": list(plans["iso"].patch_size)}
    assert DataPass().cell_overrides(["iso"]) == {}  # without --plan auto the cells keep the base config
