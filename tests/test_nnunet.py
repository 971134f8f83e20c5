"""nnU-Net v2 as a peer arm: preflight without the package (fast), settings and arms (fast), and a real
nnU-Net smoke cell on the test phantom (slow: plans, preprocesses, trains a few iterations, predicts).

The slow tests need the real ``nnunetv2`` package (the ``nnunet`` extra, part of ``test``); they skip
with the reason where it is not importable.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dualssl.config import Config
from dualssl.peers import INSTALL_HINT, missing
from dualssl.peers.nnunet import import_error, settings_for
from dualssl.recipes import PEER_ARMS, apply_recipe, load_recipes

REPO = Path(__file__).resolve().parents[1]
NNUNET_MISSING = import_error()
needs_nnunet = pytest.mark.skipif(NNUNET_MISSING is not None,
                                  reason=f"nnunetv2 not importable ({NNUNET_MISSING}); {INSTALL_HINT}")


def test_preflight_refuses_an_nnunet_arm_without_nnunetv2(phantom_root, tmp_path):
    # sys.modules[name] = None is Python's own way to make `import name` fail (ModuleNotFoundError),
    # so this runs the real preflight as it behaves in a Python without nnunetv2, installed or not
    code = ("import sys; sys.modules['nnunetv2'] = None\n"
            "from studies.domain_shift import main\n"
            f"sys.exit(main(['--smoke-test', '--arms', 'plain,nnunet-da5', '--data', {str(phantom_root)!r}, "
            f"'--storage-path', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--arms nnunet-da5" in done.stderr and "nnunetv2" in done.stderr
    assert 'pip install -e ".[nnunet]"' in done.stderr  # the install command
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_peer_arms_are_known_and_usable_from_an_arms_file(tmp_path):
    assert set(PEER_ARMS) == {"nnunet", "nnunet-da5"}
    assert missing("nnunet-ssl") and "unknown peer" in missing("nnunet-ssl")
    arms = tmp_path / "arms.yaml"
    arms.write_text("my-nnunet:\n  study.peer: nnunet\n  study.peer_plan: full\n")
    assert load_recipes(arms) == {"my-nnunet": {"study.peer": "nnunet", "study.peer_plan": "full"}}


def test_peer_label_reaches_the_trial_settings():
    from studies.domain_shift import make_cells
    from studies.trainable import split_config

    cell = make_cells({"nnunet": dict(PEER_ARMS["nnunet"])}, [3], ["pv_standard"])[0]
    cfg, settings = split_config({"study.overrides": cell})
    assert (settings.peer, settings.arm, cfg.optim.seed) == ("nnunet", "nnunet", 3)


def test_budget_matches_the_other_arms_and_the_plan_follows_the_device():
    from studies.peer_cell import plan_for

    cfg = apply_recipe(Config(), "demo")
    s = settings_for(cfg, "nnunet-da5", plan="capped", cpus=2)
    assert s.iterations == cfg.optim.epochs * cfg.optim.steps_per_epoch == 300
    assert (s.iterations_per_epoch, s.epochs, s.da_workers, s.batch_size) == (30, 10, 2, 2)
    assert s.patch_cap == max(cfg.data.patch_size) and s.mirroring is False
    assert settings_for(cfg, "nnunet", plan="full").mirroring is True  # nnU-Net's own default
    assert (plan_for("auto", 0.0), plan_for("auto", 1.0), plan_for("capped", 1.0)) == ("capped", "full", "capped")


@pytest.fixture(scope="module")
def nnunet_cell(phantom_root, tmp_path_factory):
    """One nnU-Net smoke cell (capped plan, 2 epochs of 3 iterations), trained and evaluated without Ray."""
    from studies.peer_cell import peer_cell_task

    cfg = apply_recipe(Config(), "smoke")
    cfg.data.root = str(phantom_root)
    cfg.data.source_sites = ["pv_standard"]
    cfg.optim.epochs, cfg.optim.steps_per_epoch = 2, 3
    work = tmp_path_factory.mktemp("nnunet") / "peer_cell"
    return cfg, work, peer_cell_task(cfg.to_dict(), "nnunet", "capped", str(work), 1, 0)


@pytest.mark.slow
@needs_nnunet
def test_nnunet_cell_trains_on_the_cells_split_and_predicts_every_unseen_case(nnunet_cell):
    from studies.crosssite import evaluation_parts
    from dualssl.peers.nnunet import cell_split

    cfg, work, out = nnunet_cell
    split = cell_split(cfg)
    # nnU-Net trained on exactly the cell's split: one fold, dualssl's train / validation cases
    folds = json.loads(out["files"]["nnunet_splits_final.json"])
    assert folds == [{"train": [c.case_id for c in split.train], "val": [c.case_id for c in split.val]}]
    raw = sorted(p.name for p in (work / "nnUNet_raw").glob("Dataset*/imagesTr/*.nii.gz"))
    assert raw == sorted(f"{c.case_id}_0000.nii.gz" for c in [*split.train, *split.val])
    log = "".join(v.decode() for k, v in out["files"].items() if k.startswith("nnunet_training_log"))
    assert f"This split has {len(split.train)} training and {len(split.val)} validation cases" in log
    assert "Epoch 1" in log and "Epoch 2" not in log  # the budget: 2 epochs

    # the capped plan (nnU-Net's planner, capacity capped) and nnU-Net's final checkpoint
    plan = json.loads(out["files"]["nnunet_plans.json"])["configurations"]["3d_fullres"]
    assert plan["batch_size"] == 2 and max(plan["architecture"]["arch_kwargs"]["features_per_stage"]) <= 80
    assert max(plan["patch_size"]) <= max(cfg.data.patch_size)
    assert (Path(out["info"]["fold_folder"]) / "checkpoint_final.pth").is_file()

    # every source-validation and unseen case scored (report + oracle selection part)
    parts = evaluation_parts(cfg)
    rows = {}
    for name in ("per_case.csv", "oracle_per_case.csv"):
        rows.update({r["case_id"]: r for r in csv.DictReader(out["files"][name].decode().splitlines())})
    expected = {c.case_id for part in parts.values() for c in part}
    assert set(rows) == expected
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows.values())
    assert out["summary"]["settings"]["plan"] == "nnU-Net pipeline, capped plan"


@pytest.mark.slow
@needs_nnunet
def test_nnunet_predicts_in_the_input_geometry(nnunet_cell, phantom_root):
    from dualssl.peers.nnunet import NnunetPredictor

    _, _, out = nnunet_cell
    predictor = NnunetPredictor(Path(out["info"]["fold_folder"]), mirroring=False)
    image_path = phantom_root / "imagesTr" / "cone_beam_000.nii.gz"
    image = nib.load(image_path)
    mask = predictor.predict_file(image_path)
    assert mask.shape == image.shape[:3]
    assert np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


@pytest.mark.slow
@needs_nnunet
def test_study_with_an_nnunet_arm_joins_its_rows_and_paired_statistics(phantom_root, tmp_path):
    """One budgeted study (``--budgets 8 --reference nnunet``: the smoke recipe's 2 x 4 steps) with
    plain and nnunet: the nnU-Net rows join ours, the paired statistics are plain@8 - nnunet@8, each
    cell's budget and wall time are in cells.csv and the report, and the report explains nnU-Net's
    normalisation against each site's pancreas."""
    from dualssl.stats import read_cases
    from dualssl.stats.paired import paired_differences

    storage = tmp_path / "studies"
    done = subprocess.run([sys.executable, str(REPO / "studies" / "domain_shift.py"), "--smoke-test",
                           "--arms", "plain,nnunet", "--seeds", "1", "--budgets", "8", "--reference", "nnunet",
                           "--data", str(phantom_root), "--storage-path", str(storage),
                           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--n-boot", "200",
                           "--workers-per-trial", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = storage / "dualssl-domain-shift-smoke"
    rows = read_cases(study / "cases.csv")
    unseen = {arm: sorted(r["case_id"] for r in rows if r["arm"] == arm and r["role"] == "unseen")
              for arm in ("plain@8", "nnunet@8")}
    assert unseen["nnunet@8"] == unseen["plain@8"] and len(unseen["nnunet@8"]) == 10
    paired = paired_differences([r for r in rows if r["role"] == "unseen"], reference="nnunet@8", by=("site",),
                                n_boot=200)
    assert {(r["arm"], r["site"]) for r in paired} == {("plain@8", "cone_beam"), ("plain@8", "native_thick")}
    assert all(r["n_pairs"] == 5 for r in paired)
    # the budget report pairs plain - nnunet at that budget, on the very rows above
    with open(study / "report" / "budget-8" / "paired_differences.csv", newline="") as fh:
        per_site = {r["site"]: r for r in csv.DictReader(fh) if r.get("site")}
    for r in paired:
        assert float(per_site[r["site"]]["mean_diff"]) == pytest.approx(r["mean_diff"], abs=1e-9)
        assert per_site[r["site"]]["arm"] == "plain" and per_site[r["site"]]["reference"] == "nnunet"
    # each cell's budget and wall time; nnU-Net's plan from its own plans
    with open(study / "cells.csv", newline="") as fh:
        cells = {r["cell"]: r for r in csv.DictReader(fh)}
    assert sorted(cells) == ["nnunet@8-s0-pv_standard", "plain@8-s0-pv_standard"]
    ours, peer = cells["plain@8-s0-pv_standard"], cells["nnunet@8-s0-pv_standard"]
    assert int(ours["budget_iterations"]) == 8 and int(peer["budget_iterations"]) == 8
    assert ours["system"] == "dualssl engine" and "nnU-Net pipeline, capped plan" in peer["system"]
    plans = json.loads((study / "cells" / "nnunet@8-s0-pv_standard" / "nnunet_plans.json").read_text())
    patch = plans["configurations"]["3d_fullres"]["patch_size"]
    assert int(peer["patch_voxels"]) == int(np.prod(patch)) and float(peer["wall_s"]) > 0
    # nnU-Net's plans and training log are the cell's artifacts
    cell = study / "cells" / "nnunet@8-s0-pv_standard"
    assert (cell / "nnunet_plans.json").is_file() and list(cell.glob("nnunet_training_log_*.txt"))
    top = (study / "report" / "report.md").read_text()
    assert "## Budget axis" in top and "## Budget and wall time per arm" in top and "(budget-8/report.html)" in top
    # the intensity section uses this cell's fitted normalisation
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    assert "## Intensity: where each site's pancreas falls" in top
    assert f"then (HU - {props['mean']:.0f}) / {props['std']:.0f}" in top
    manifest = json.loads((study / "study.json").read_text())
    assert manifest["budgets"] == [8] and manifest["reference"] == "nnunet"
    import mlflow

    parent = mlflow.MlflowClient(manifest["tracking_uri"]).get_run(manifest["parent_run_id"])
    assert json.loads(parent.data.params["arm.plain_at_8"])["optim.epochs"] == 2  # MLflow refuses '@' in a name
    printed = done.stdout.splitlines()
    start = next(i for i, line in enumerate(printed) if "Δ vs nnunet@B [95% CI]" in line) + 1
    assert [line.split()[0] for line in printed[start:start + 2]] == ["nnunet@8", "plain@8"]
