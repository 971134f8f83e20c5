"""The oracle's selection/report split, the flat metric names, and a checkpoint evaluated on every part."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dualssl.config import Config
from dualssl.data.datalist import Case, DatasetError, split_selection_report
from dualssl.evaluation.metrics import summarise
from studies.crosssite import evaluate_checkpoint, evaluation_parts, flat_metrics, is_cross_metric


def _cases(site: str, n: int) -> list[Case]:
    return [Case(case_id=f"{site}_{i:02d}", image=f"/x/{site}_{i}.nii.gz", label=f"/y/{site}_{i}.nii.gz", site=site)
            for i in range(n)]


def test_selection_report_split_is_half_half_disjoint_and_order_free():
    test = {"a": _cases("a", 10), "b": _cases("b", 5), "c": _cases("c", 1), "d": _cases("d", 2)}
    selection, report = split_selection_report(test, seed=3)
    assert {s: len(v) for s, v in selection.items()} == {"a": 5, "b": 2, "c": 0, "d": 1}
    assert {s: len(v) for s, v in report.items()} == {"a": 5, "b": 3, "c": 1, "d": 1}  # one case: report
    for site, cases in test.items():
        sel, rep = {c.case_id for c in selection[site]}, {c.case_id for c in report[site]}
        assert not sel & rep and sel | rep == {c.case_id for c in cases}
        assert [c.case_id for c in report[site]] == sorted(rep)

    shuffled = {}
    for site in reversed(list(test)):  # other site order and other case order
        cases = list(test[site])
        random.Random(1).shuffle(cases)
        shuffled[site] = cases
    assert split_selection_report(shuffled, seed=3) == (selection, report)
    # a case list with one case more keeps the others where they were (membership hashed per case id)
    grown = dict(test, a=test["a"] + [Case("a_99", "/x/a99", "/y/a99", "a")])
    sel_grown, _ = split_selection_report(grown, seed=3)
    assert len({c.case_id for c in selection["a"]} ^ {c.case_id for c in sel_grown["a"]}) <= 2
    # another seed draws another split (fixed seeds: this is deterministic)
    assert split_selection_report(test, seed=4)[0]["a"] != selection["a"]


def test_selection_report_split_refuses_an_empty_report_part():
    with pytest.raises(DatasetError, match="selection_fraction"):
        split_selection_report({"a": _cases("a", 4)}, seed=0, selection_fraction=1.0)


def _row(site: str, case_id: str, dice: float, hd95: float) -> dict:
    return {"case_id": case_id, "site": site, "dice": dice, "jaccard": dice / (2 - dice), "nsd": dice,
            "hd95": hd95, "asd": hd95 / 2, "empty_pred": False, "empty_label": False}


def test_flat_metrics_names_reported_and_oracle_numbers_apart():
    reported = summarise([_row("src", "s0", 0.9, 2.0), _row("a", "a0", 0.8, 4.0), _row("a", "a1", 0.4, 8.0),
                          _row("b", "b0", 0.6, 6.0)], ["src"])
    oracle = summarise([_row("a", "a2", 0.7, 3.0), _row("b", "b1", 0.2, 9.0), _row("b", "b2", 0.4, 7.0)], ["src"])
    flat = flat_metrics({**reported, "oracle": oracle})

    assert flat["site/src/source"] == 1.0 and flat["site/a/source"] == 0.0
    assert flat["site/src/dice_mean"] == pytest.approx(0.9) and flat["site/src/n"] == 1.0
    assert math.isnan(flat["site/src/dice_std"])  # one case
    assert flat["site/a/dice_mean"] == pytest.approx(0.6) and flat["site/a/dice_median"] == pytest.approx(0.6)
    assert flat["site/a/dice_std"] == pytest.approx(np.std([0.8, 0.4], ddof=1))
    assert flat["site/a/failure_rate"] == pytest.approx(0.5) and flat["site/a/hd95_mean"] == pytest.approx(6.0)
    assert flat["site/a/nsd_mean"] == pytest.approx(0.6) and flat["site/a/n_missed"] == 0.0
    # across: unseen sites a (0.6) and b (0.6) only, never the source's 0.9
    assert flat["mean_unseen_dice"] == pytest.approx(0.6) and flat["worst_site_dice"] == pytest.approx(0.6)
    assert flat["std_across_sites"] == pytest.approx(0.0)
    assert flat["stability"] == pytest.approx(np.std([0.8, 0.4, 0.6], ddof=1))
    assert flat["failure_rate"] == pytest.approx(1 / 3)
    # oracle: selection part only, under its own prefix
    assert flat["oracle/mean_unseen_dice"] == pytest.approx((0.7 + 0.3) / 2)
    assert flat["oracle/site/b/dice_mean"] == pytest.approx(0.3) and flat["oracle/worst_site_dice"] == pytest.approx(0.3)
    assert flat["oracle/failure_rate"] == pytest.approx(2 / 3)
    assert not any(k.startswith("oracle/site/src") for k in flat)
    assert all(isinstance(v, float) for v in flat.values()) and "worst_site" not in flat
    assert all(is_cross_metric(k) for k in flat) and not is_cross_metric("best_val_dice")
    # a summary without an oracle part gives the reported names only
    assert not any(k.startswith("oracle/") for k in flat_metrics(reported))


def _read_csv(blob: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(blob.decode())))


def write_tiny_msd(root: Path, sites: dict[str, int]) -> Path:
    """MSD layout, one 40x32x16 CT per case (air, a 0 HU body, a 200 HU ellipsoid = the label)."""
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (40, 32, 16)], indexing="ij"), -1).astype(float)
    entries = []
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for site, n in sites.items():
        for i in range(n):
            label = (((grid - (18 + i, 16, 8)) / (6.0, 5.0, 3.0)) ** 2).sum(-1) <= 1.0
            body = (((grid - (20, 16, 8)) / (17.0, 13.0, 9.0)) ** 2).sum(-1) <= 1.0
            ct = np.where(label, 200, np.where(body, 0, -1000)).astype(np.int16)
            name = f"{site}_{i}.nii.gz"
            nib.save(nib.Nifti1Image(ct, affine), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / name)
            entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "site": site})
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": {"0": "background", "1": "pancreas"},
                                                   "training": entries}))
    return root


def test_checkpoint_is_evaluated_on_source_validation_report_and_selection_parts(tmp_path):
    from dualssl.engine.checkpoint import CHECKPOINT_FORMAT
    from dualssl.models import build_model
    from studies.train_loop import CHECKPOINT_FILE

    root = write_tiny_msd(tmp_path / "data", {"src": 2, "far": 3, "near": 2, "lone": 1})
    cfg = Config().with_overrides({"model.widths": (8, 8, 8, 8), "data.patch_size": (32, 32, 16),
                                   "data.spacing": (3.0, 3.0, 5.0), "eval.sw_batch_size": 1,
                                   "data.root": str(root), "data.source_sites": "src",
                                   "data.val_fraction": 0.5, "data.split_seed": 1}).validate()
    torch.manual_seed(0)
    state = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": build_model(cfg.model).state_dict(),
             "epoch": 3}
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / CHECKPOINT_FILE)

    parts = evaluation_parts(cfg)
    sites = lambda part: sorted(c.site for c in parts[part])  # noqa: E731
    assert sites("source") == ["src"]  # the validation case, never the training case
    assert sites("selection") == ["far", "near"]  # floor(3 / 2) and floor(2 / 2); the lone case reports
    assert sites("report") == ["far", "far", "lone", "near"]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = evaluate_checkpoint(tmp_path / "ckpt", device="cpu", threads=1)
        # the caller's thread count is back (it once stayed at 1 for the rest of the test session)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert out["epoch"] == 2
    assert sorted(out["files"]) == ["oracle_per_case.csv", "oracle_summary.json", "per_case.csv", "summary.json"]
    reported, oracle = _read_csv(out["files"]["per_case.csv"]), _read_csv(out["files"]["oracle_per_case.csv"])
    assert [r["case_id"] for r in reported] == [c.case_id for c in parts["source"] + parts["report"]]
    assert [r["case_id"] for r in oracle] == [c.case_id for c in parts["selection"]]
    assert [r["role"] for r in reported] == ["source"] + ["unseen"] * 4

    summary = out["summary"]
    assert summary["per_site"]["src"]["source"] is True and summary["per_site"]["src"]["n"] == 1
    assert summary["across_sites"]["unseen_sites"] == ["far", "lone", "near"]  # the source stays out
    assert set(summary["oracle"]["per_site"]) == {"far", "near"}
    assert json.loads(out["files"]["summary.json"])["across_sites"]["n_cases"] == 4
    assert json.loads(out["files"]["oracle_summary.json"])["across_sites"]["n_cases"] == 2

    flat = flat_metrics(summary)
    for site in ("far", "lone", "near"):  # independent: means of the per-case CSV columns
        assert flat[f"site/{site}/dice_mean"] == pytest.approx(
            np.mean([float(r["dice"]) for r in reported if r["site"] == site]))
    for site in ("far", "near"):
        assert flat[f"oracle/site/{site}/dice_mean"] == pytest.approx(
            np.mean([float(r["dice"]) for r in oracle if r["site"] == site]))
    unseen_means = [flat[f"site/{s}/dice_mean"] for s in ("far", "lone", "near")]
    assert flat["mean_unseen_dice"] == pytest.approx(np.mean(unseen_means))
    assert flat["oracle/mean_unseen_dice"] == pytest.approx(
        np.mean([flat["oracle/site/far/dice_mean"], flat["oracle/site/near/dice_mean"]]))
    assert flat["site/src/source"] == 1.0 and "oracle/site/src/n" not in flat and "oracle/site/lone/n" not in flat
