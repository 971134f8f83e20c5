"""Pooling finished domain-shift studies (``studies/combine_studies.py``): the pooled report pairs arms
from different studies case by case, and studies that did not see the same data or split are refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dualssl.config import ConfigError
from studies.combine_studies import combine, main
from studies.shift_table import CASE_COLUMNS, write_csv

SITES = ("lowdose", "native")
SEEDS = (0, 1, 2)
VAL = ("src_000", "src_001")


def _fingerprint(label_ml: float = 70.0) -> dict:
    cases = [{"case_id": c, "site": "src", "image": f"/x/{c}.nii.gz", "spacing": [2.0, 2.0, 3.0], "shape": [64, 64, 32],
              "orientation": "RAS", "dtype": "int16", "body_percentiles": [-300, 40], "label_percentiles": [20, 80],
              "label_ml": label_ml} for c in (*VAL, "src_002")]
    return {"cases": cases, "sites": {}}


def write_study(folder, arm: str, dice_of, *, reference: str, val=VAL, fingerprint=None, budget=10):
    """A finished study folder of one arm ``ARM@budget``: source-val rows and every unseen case of SITES."""
    folder.mkdir(parents=True)
    name = f"{arm}@{budget}"
    rows = []
    for seed in SEEDS:
        cell = f"{name}-s{seed}-src"
        for case in val:
            rows.append({"arm": name, "seed": seed, "source_site": "src", "site": "src", "case_id": case,
                         "role": "source", "part": "report", "dice": 0.8, "cell": cell})
        for site in SITES:
            for i in range(6):
                rows.append({"arm": name, "seed": seed, "source_site": "src", "site": site, "case_id": f"{site}_{i}",
                             "role": "unseen", "part": "report", "dice": dice_of(seed, site, i), "cell": cell})
    write_csv(rows, folder / "cases.csv", CASE_COLUMNS)
    write_csv([{"cell": f"{name}-s{s}-src", "arm": name, "seed": s, "status": "completed"} for s in SEEDS],
              folder / "cells.csv")
    (folder / "study.json").write_text(json.dumps({
        "experiment": folder.name, "reference": reference,
        "arms_provenance": [{"arm": name, "settings_from": "test", "differences": "none"}]}))
    (folder / "fingerprint").mkdir()
    (folder / "fingerprint" / "fingerprint.json").write_text(json.dumps(fingerprint or _fingerprint()))
    return folder


def _base(seed, site, i):
    return float(np.random.default_rng([seed, SITES.index(site), i]).uniform(0.2, 0.7))


def test_arms_of_two_studies_pair_case_by_case(tmp_path):
    a = write_study(tmp_path / "nn", "nnunet", _base, reference="nnunet")
    b = write_study(tmp_path / "ours", "ours", lambda s, site, i: _base(s, site, i) + (0.1 if site == "native" else 0.0),
                    reference="ours")
    paths = combine([a, b], tmp_path / "out", reference="nnunet", n_boot=200)
    assert set(paths["budgets"]) == {10}
    with open(paths["budgets"][10]["paired_csv"], newline="") as fh:
        paired = list(csv.DictReader(fh))
    # within a budget report arms are bare; the pooled row has no site
    diff = {r["site"] or "pooled": float(r["mean_diff"]) for r in paired if r["arm"] == "ours"}
    # hand-computed: +0.1 on every native case, 0 on lowdose; pooled over both sites equally: +0.05
    assert diff["native"] == pytest.approx(0.1) and diff["lowdose"] == pytest.approx(0.0, abs=1e-12)
    assert diff["pooled"] == pytest.approx(0.05)
    with open(tmp_path / "out" / "cases.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * len(SEEDS) * (len(VAL) + 6 * len(SITES))
    assert (tmp_path / "out" / "report" / "report.md").is_file()


def test_studies_of_other_data_another_split_or_a_shared_arm_are_refused(tmp_path, capsys):
    a = write_study(tmp_path / "a", "nnunet", _base, reference="nnunet")
    other_data = write_study(tmp_path / "b", "ours", _base, reference="ours", fingerprint=_fingerprint(label_ml=71.0))
    with pytest.raises(ConfigError, match="different data"):
        combine([a, other_data], tmp_path / "o1", reference="nnunet")
    other_split = write_study(tmp_path / "c", "ours", _base, reference="ours", val=("src_000", "src_002"))
    with pytest.raises(ConfigError, match="splits differ"):
        combine([a, other_split], tmp_path / "o2", reference="nnunet")
    same_arm = write_study(tmp_path / "d", "nnunet", _base, reference="nnunet")
    with pytest.raises(ConfigError, match="'nnunet@10' is in both"):
        combine([a, same_arm], tmp_path / "o3", reference="nnunet")
    (unfinished := tmp_path / "e").mkdir()
    assert main([str(a), str(unfinished), "--out", str(tmp_path / "o4"), "--reference", "nnunet"]) == 2
    assert "study.json: missing" in capsys.readouterr().err
