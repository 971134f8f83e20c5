"""Metrics per case (against an independent scipy computation), per site, across sites; report writers."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from dualssl.evaluation.metrics import case_metrics, probability_metrics, summarise
from dualssl.evaluation.report import write_per_case_csv, write_summary_json


def scipy_reference(pred: np.ndarray, label: np.ndarray, spacing, tolerance: float = 2.0) -> dict[str, float]:
    """Independent computation: surfaces = mask minus its 6-neighbour erosion; exact EDT in mm;
    HD95 = max over the two directions of the 95th percentile of that direction's distances;
    NSD = surface voxels of both masks within ``tolerance`` mm of the other surface / all surface voxels."""
    sp, sy = pred ^ ndimage.binary_erosion(pred), label ^ ndimage.binary_erosion(label)
    d_py = ndimage.distance_transform_edt(~sy, sampling=spacing)[sp]
    d_yp = ndimage.distance_transform_edt(~sp, sampling=spacing)[sy]
    inter = float((pred & label).sum())
    return {"dice": 2 * inter / float(pred.sum() + label.sum()),
            "jaccard": inter / float((pred | label).sum()),
            "nsd": float((d_py <= tolerance).sum() + (d_yp <= tolerance).sum()) / (d_py.size + d_yp.size),
            "hd95": max(np.percentile(d_py, 95), np.percentile(d_yp, 95)),
            "asd": float(np.concatenate([d_py, d_yp]).mean())}


def shifted(mask: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """Copy of ``mask`` moved by whole voxels (zeros enter at the borders)."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -s), n - max(0, s)) for n, s in zip(mask.shape, shift))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for n, s in zip(mask.shape, shift))
    out[dst] = mask[src]
    return out


def assert_close_to_reference(got: dict[str, float], ref: dict[str, float]) -> None:
    assert got["dice"] == pytest.approx(ref["dice"], abs=1e-6)
    assert got["jaccard"] == pytest.approx(ref["jaccard"], abs=1e-6)
    assert got["nsd"] == pytest.approx(ref["nsd"], abs=1e-6)
    assert got["hd95"] == pytest.approx(ref["hd95"], abs=0.1)
    assert got["asd"] == pytest.approx(ref["asd"], abs=1e-3)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_surface_distances_use_the_spacing_of_each_axis(axis):
    # A one-voxel-thick plate moved by 2 voxels across its normal: every surface voxel is exactly
    # 2 * spacing[axis] mm from the other plate, so HD95 and ASD both equal that distance.
    spacing = (0.7, 0.9, 2.5)
    label = np.zeros((12, 12, 12), dtype=bool)
    index: list[slice | int] = [slice(2, 10)] * 3
    index[axis] = 4
    label[tuple(index)] = True
    move = [0, 0, 0]
    move[axis] = 2
    pred = shifted(label, tuple(move))
    for method in ("monai", "edt"):
        m = case_metrics(pred, label, spacing, method=method)
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0
        assert m["hd95"] == pytest.approx(2 * spacing[axis], abs=1e-5)
        assert m["asd"] == pytest.approx(2 * spacing[axis], abs=1e-5)
        # NSD at 2 mm: 1.4 mm and 1.8 mm apart are within tolerance, 5.0 mm is not
        assert m["nsd"] == (1.0 if 2 * spacing[axis] <= 2.0 else 0.0)
        assert case_metrics(pred, label, spacing, method=method, nsd_tolerance_mm=5.0)["nsd"] == 1.0


@pytest.mark.parametrize("method", ["monai", "edt"])
def test_hand_counted_plates(method):
    # label: one 8x8 plate at x=4; pred: the same plate plus a second one at x=10 (1 mm voxels).
    # Surfaces: 64 label voxels at 0 mm; pred 64 at 0 mm and 64 at 6 mm from the label's surface.
    label = np.zeros((16, 12, 12), bool)
    label[4, 2:10, 2:10] = True
    pred = label.copy()
    pred[10, 2:10, 2:10] = True
    m = case_metrics(pred, label, (1.0, 1.0, 1.0), method=method)
    assert m["dice"] == pytest.approx(2 * 64 / (128 + 64))
    assert m["jaccard"] == pytest.approx(64 / 128)
    assert m["nsd"] == pytest.approx((64 + 64) / (128 + 64))  # 2/3: the far plate is outside 2 mm
    assert m["hd95"] == pytest.approx(6.0)  # pred->label: half at 0, half at 6 mm
    assert m["asd"] == pytest.approx(64 * 6.0 / 192)  # 2 mm


def test_case_metrics_match_scipy_on_random_blobs():
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.normal(size=(2, 36, 32, 20)), sigma=(0, 3, 3, 2))
    label, pred = field[0] > 0.02, field[1] > 0.02  # several irregular components each
    spacing = (0.8, 1.1, 2.0)
    ref = scipy_reference(pred, label, spacing)
    for method in ("monai", "edt", "auto"):
        got = case_metrics(torch.from_numpy(pred[None].astype(np.uint8)), label.astype(np.int16), spacing,
                           method=method)
        assert_close_to_reference(got, ref)
    for tolerance in (0.5, 2.0, 4.0):  # NSD moves with the tolerance as the reference says
        assert case_metrics(pred, label, spacing, nsd_tolerance_mm=tolerance)["nsd"] == pytest.approx(
            scipy_reference(pred, label, spacing, tolerance)["nsd"], abs=1e-6)
    assert 0.0 < ref["nsd"] < 1.0
    same = case_metrics(label, label, spacing)
    assert same == {"dice": 1.0, "jaccard": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0}


def test_empty_masks_have_the_documented_values():
    # The old code returned the image diagonal (here 25.7 mm) as HD95/ASD of a missed organ.
    shape, spacing = (10, 12, 8), (0.5, 0.5, 3.0)
    empty, blob = np.zeros(shape, bool), np.zeros(shape, bool)
    blob[3:6, 4:8, 2:5] = True
    assert case_metrics(empty, empty, spacing) == {"dice": 1.0, "jaccard": 1.0, "nsd": 1.0, "hd95": 0.0, "asd": 0.0}
    for pred, label in [(empty, blob), (blob, empty)]:
        m = case_metrics(pred, label, spacing)
        assert (m["dice"], m["jaccard"], m["nsd"]) == (0.0, 0.0, 0.0)
        assert math.isnan(m["hd95"]) and math.isnan(m["asd"])


def test_case_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 0, 1))
    with pytest.raises(ValueError, match="3D mask"):
        case_metrics(np.ones((4, 4)), np.ones((4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="method"):
        case_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1, 1, 1), method="kdtree")


@pytest.mark.realdata
def test_real_nih_label_against_a_shifted_copy_matches_scipy(shared_data):
    img = nib.load(shared_data / "real" / "nih_pancreas_ct_0001" / "pancreas.nii.gz")
    label = np.asanyarray(img.dataobj) != 0
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(img.affine))
    assert spacing == pytest.approx((0.859375, 0.859375, 1.0), abs=1e-4)
    coords = np.argwhere(label)
    lo, hi = coords.min(0) - 6, coords.max(0) + 7  # margin > shift: nothing leaves the box
    label = label[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    pred = shifted(label, (3, -2, 2))
    assert pred.sum() == label.sum()
    got = case_metrics(pred, label, spacing, method="monai")
    ref = scipy_reference(pred, label, spacing)
    assert_close_to_reference(got, ref)
    assert_close_to_reference(case_metrics(pred, label, spacing, method="edt"), ref)
    assert 0.5 < got["dice"] < 0.95 and got["hd95"] > 2.0  # the shift is visible, not a degenerate case


def _rows(rng: np.random.Generator) -> list[dict]:
    rows = []
    for site, n in [("src", 3), ("a", 4), ("b", 2), ("c", 5)]:
        for i in range(n):
            rows.append({"case_id": f"{site}_{i}", "site": site, "dice": float(rng.uniform(0.3, 0.95)),
                         "jaccard": float(rng.uniform(0.2, 0.9)), "nsd": float(rng.uniform(0.2, 1.0)),
                         "hd95": float(rng.uniform(1, 30)), "asd": float(rng.uniform(0.2, 8)),
                         "empty_pred": False, "empty_label": False, "pred_ml": 1.0})
    return rows


def _row(site: str, case_id: str, dice: float, hd95: float, missed: bool = False) -> dict:
    return {"case_id": case_id, "site": site, "dice": dice, "jaccard": dice / (2 - dice), "nsd": dice,
            "hd95": math.nan if missed else hd95, "asd": math.nan if missed else hd95 / 3,
            "empty_pred": missed, "empty_label": False}


HAND_ROWS = [_row("src", "s0", 0.95, 2.0), _row("src", "s1", 0.85, 4.0),
             _row("a", "a0", 0.9, 3.0), _row("a", "a1", 0.0, 0.0, missed=True), _row("a", "a2", 0.6, 5.0),
             _row("b", "b0", 0.3, 9.0)]


def test_summarise_hand_chosen_numbers():
    out = summarise(HAND_ROWS, source_sites=["src"])
    a, b, src = out["per_site"]["a"], out["per_site"]["b"], out["per_site"]["src"]
    # site a: Dice 0.9, 0.0 (missed), 0.6 -> mean 0.5, median 0.6, sample std sqrt(0.42 / 2)
    assert (a["n"], a["source"]) == (3, False) and src["source"] is True
    assert a["dice_mean"] == pytest.approx(0.5) and a["dice_median"] == pytest.approx(0.6)
    assert a["dice_std"] == pytest.approx(math.sqrt(0.21))
    assert a["failure_rate"] == pytest.approx(1 / 3) and a["dice_min_case"] == "a1"
    # HD95/ASD over the two cases with a prediction; the missed case is counted, not averaged
    assert a["hd95_mean"] == pytest.approx(4.0) and a["hd95_std"] == pytest.approx(math.sqrt(2.0))
    assert a["asd_mean"] == pytest.approx(4.0 / 3) and (a["n_missed"], a["n_spurious"]) == (1, 0)
    assert a["nsd_mean"] == pytest.approx(0.5)
    # one case: the sample std is undefined
    assert b["dice_mean"] == pytest.approx(0.3) and math.isnan(b["dice_std"]) and b["failure_rate"] == 1.0
    assert src["dice_mean"] == pytest.approx(0.9) and src["dice_std"] == pytest.approx(math.sqrt(0.005))

    across = out["across_sites"]
    assert across["unseen_sites"] == ["a", "b"] and (across["n_sites"], across["n_cases"]) == (2, 4)
    assert across["mean_unseen_dice"] == pytest.approx(0.4)  # (0.5 + 0.3) / 2: the source is left out
    assert across["std_across_sites"] == pytest.approx(math.sqrt(0.02))
    assert (across["worst_site"], across["worst_site_dice"]) == ("b", pytest.approx(0.3))
    assert across["stability"] == pytest.approx(math.sqrt(0.45 / 3))  # Dice 0.9, 0, 0.6, 0.3 around 0.45
    assert across["failure_rate"] == pytest.approx(0.5)


def test_summarise_per_site_and_across_unseen_sites():
    rows = _rows(np.random.default_rng(7))
    rows[4]["hd95"] = math.nan  # a missed case
    rows[4]["empty_pred"] = True
    out = summarise(rows, source_sites=["src"])
    assert set(out["per_site"]) == {"src", "a", "b", "c"}
    for site, stats in out["per_site"].items():
        mine = [r for r in rows if r["site"] == site]
        dice = np.array([r["dice"] for r in mine])
        assert stats["n"] == len(mine) and stats["source"] == (site == "src")
        assert stats["dice_mean"] == pytest.approx(dice.mean())
        assert stats["dice_std"] == pytest.approx(np.std(dice, ddof=1))
        assert stats["dice_median"] == pytest.approx(np.median(dice))
        assert stats["dice_min"] == pytest.approx(dice.min())
        assert stats["failure_rate"] == pytest.approx(np.mean(dice < 0.5))
        assert stats["dice_min_case"] == mine[int(dice.argmin())]["case_id"]
        assert stats["n_missed"] == sum(r["empty_pred"] for r in mine)
        for name in ("jaccard", "nsd", "hd95", "asd"):
            vals = np.array([r[name] for r in mine])
            assert stats[f"{name}_mean"] == pytest.approx(np.nanmean(vals))
            assert stats[f"{name}_std"] == pytest.approx(np.nanstd(vals, ddof=1))

    across = out["across_sites"]
    unseen = ["a", "b", "c"]
    means = np.array([np.mean([r["dice"] for r in rows if r["site"] == s]) for s in unseen])
    assert across["unseen_sites"] == unseen and across["n_sites"] == 3 and across["n_cases"] == 11
    assert across["mean_unseen_dice"] == pytest.approx(means.mean())
    assert across["std_across_sites"] == pytest.approx(np.std(means, ddof=1))
    assert across["worst_site"] == unseen[int(means.argmin())]
    assert across["worst_site_dice"] == pytest.approx(means.min())
    unseen_dice = np.array([r["dice"] for r in rows if r["site"] != "src"])
    assert across["stability"] == pytest.approx(np.std(unseen_dice, ddof=1))
    assert across["failure_rate"] == pytest.approx(np.mean(unseen_dice < 0.5))


def test_summarise_without_unseen_sites_and_with_bad_rows():
    rows = [r for r in _rows(np.random.default_rng(1)) if r["site"] == "src"]
    across = summarise(rows, source_sites=["src"])["across_sites"]
    assert across["n_sites"] == 0 and across["mean_unseen_dice"] is None and across["worst_site"] is None
    with pytest.raises(ValueError, match=r"rows\[0\].*hd95"):
        summarise([{"site": "a", "dice": 1.0, "jaccard": 1.0, "nsd": 1.0, "asd": 0.0, "empty_pred": False,
                    "empty_label": False}], source_sites=[])


def test_reports_round_trip(tmp_path):
    rows = _rows(np.random.default_rng(2))
    rows[0].update(hd95=math.nan, asd=math.nan, empty_pred=True)
    csv_path = write_per_case_csv(rows, tmp_path / "out" / "per_case.csv")
    with csv_path.open() as fh:
        read = list(csv.DictReader(fh))
    assert list(read[0])[:7] == ["case_id", "site", "dice", "jaccard", "nsd", "hd95", "asd"]
    assert "pred_ml" in read[0] and len(read) == len(rows)
    assert float(read[1]["dice"]) == pytest.approx(rows[1]["dice"])

    summary = summarise(rows, source_sites=["src"])
    # the CSV's strings ("nan", "True") give the same summary as the rows in memory
    assert json.dumps(summarise(read, source_sites=["src"]), sort_keys=True) == json.dumps(summary, sort_keys=True)
    assert summary["per_site"]["src"]["n_missed"] == 1
    summary["per_site"]["src"]["hd95_mean"] = math.nan
    text = write_summary_json(summary, tmp_path / "out" / "summary.json").read_text()
    loaded = json.loads(text)  # strict JSON: NaN became null
    assert "NaN" not in text and loaded["per_site"]["src"]["hd95_mean"] is None
    assert loaded["across_sites"]["worst_site"] == summary["across_sites"]["worst_site"]


def test_probability_metrics_hand_counted():
    # 2x2x1 grid: label voxels hold 0.9 and 0.6, background 0.6 and 0.4. Pairs (label, background):
    # 0.9>0.6, 0.9>0.4, 0.6=0.6 (half), 0.6>0.4 -> AUROC 3.5 / 4. Soft Dice 2 (0.9 + 0.6) / (2.5 + 2).
    prob = np.array([0.9, 0.6, 0.6, 0.4]).reshape(2, 2, 1)
    label = np.array([1, 0, 1, 0]).reshape(2, 2, 1)
    m = probability_metrics(prob, label)
    assert m["auroc"] == pytest.approx(0.875)
    assert m["soft_dice"] == pytest.approx(3.0 / 4.5)
    assert m["mean_prob_in_label"] == pytest.approx(0.75)
    assert math.isnan(probability_metrics(prob, np.zeros_like(label))["auroc"])
    with pytest.raises(ValueError, match="same"):
        probability_metrics(prob, label.reshape(1, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        probability_metrics(prob * 2, label)
