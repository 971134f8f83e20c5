"""The `dualssl` command end to end on real files: phantom, verify, train, evaluate, predict."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from dualssl.cli import main

TINY_SETS = ["model.widths=8,16,32,64", "data.spacing=6,6,8", "data.patch_size=32,32,16", "data.batch_size=1",
             "optim.epochs=1", "optim.steps_per_epoch=1", "eval.sw_batch_size=4"]
"""Coarse voxels: ``evaluate`` slides over 10 unseen volumes and ``predict`` over one, and at 6 x 6 x 8 mm
each takes about a fifth of the windows it took at 3 x 3 x 4 mm (the smallest phantom volume, cone_beam's
49 x 37 x 18 there, is still larger than the patch)."""


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "dualssl.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("phantom", "verify-dataset", "train", "evaluate", "predict"):
        assert command in out


def test_phantom_command_writes_a_dataset_that_verifies(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--sites", "cone_beam", "--cases-per-site", "1",
                 "--scale", "0.25"]) == 0
    entries = json.loads((out / "dataset.json").read_text())["training"]
    assert [e["site"] for e in entries] == ["cone_beam"]
    assert main(["verify-dataset", str(out)]) == 0
    assert "no problems" in capsys.readouterr().out


def test_train_evaluate_predict(phantom_root, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [a for s in TINY_SETS + [f"data.cache_dir={tmp_path / 'cache'}"] for a in ("--set", s)]
    assert main(["train", "--data", str(phantom_root), "--source", "pv_standard", "--out", str(run), *sets]) == 0
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt", "summary.json", "progress.png", "config.yaml"):
        assert (run / name).is_file(), name

    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint_best.pt"), "--data", str(phantom_root),
                 "--out", str(ev)]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert set(summary["per_site"]) == {"native_thick", "cone_beam"}
    with open(ev / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)

    scan = phantom_root / json.loads((phantom_root / "dataset.json").read_text())["training"][-1]["image"]
    out = tmp_path / "pred.nii.gz"
    assert main(["predict", "--checkpoint", str(run / "checkpoint_best.pt"), str(scan), "-o", str(out)]) == 0
    src, pred = nib.load(scan), nib.load(out)
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                 "--set", "loss.tau=0"]) == 2
    assert "loss.tau" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate"])
