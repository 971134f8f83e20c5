"""The study protocol you can trust: what the user says is what runs, the driver refuses bad data
before anything starts, ASHA/Optuna/selection rank on the same number, errored trials never win,
the best (not the last) checkpoint is chosen, and the test sites never reach the selection.

Everything here is fast except the two engine runs of the leakage test and the one subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.config import Config, ConfigError  # noqa: E402
from dualssl.recipes import TINY, recipe_config  # noqa: E402
from studies.search_space import load_search_space, make_searcher  # noqa: E402
from studies.trainable import FINAL_KEY, TrialSettings, cell_tags, split_config, study_config  # noqa: E402
from studies.tune import asha_milestones, build_parser, main, prepare  # noqa: E402

SOURCE = "pv_standard"  # conftest TEST_SITES: pv_standard, native_thick, cone_beam


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def _copy(phantom_root: Path, dest: Path) -> Path:
    return Path(shutil.copytree(phantom_root, dest, ignore=shutil.ignore_patterns(".dualssl_cache")))


def _cases(root: Path) -> list[dict]:
    return json.loads((root / "dataset.json").read_text())["training"]


# --- 1. what the user says is what runs -----------------------------------------------------------
def test_set_of_a_searched_key_fixes_it_for_every_trial(tmp_path, capsys):
    plan = prepare(_args("--smoke-test", "--storage-path", str(tmp_path), "--set", "loss.lambda_con=0"))
    assert "loss.lambda_con" not in plan.search and {"loss.lambda_rec", "loss.tau"} <= set(plan.search)
    assert any("loss.lambda_con=0" in n and "taken out of the search space" in n for n in plan.notes)
    space = study_config(plan.cfg, TrialSettings(), plan.search)
    assert space["loss.lambda_con"] == 0.0
    # What Tune hands a trial: the searcher's suggestion merged over the constant param_space.
    from ray.tune.utils.util import merge_dicts

    searcher = make_searcher("objective", "max", seed=0, n_startup_trials=1)
    searcher.set_search_properties("objective", "max", space)
    for i in range(3):
        suggested = searcher.suggest(f"t{i}")
        assert "loss.lambda_con" not in suggested and "loss.tau" in suggested
        cfg, _ = split_config(merge_dicts({k: v for k, v in space.items() if k not in plan.search}, suggested))
        assert cfg.loss.lambda_con == 0.0 and not cfg.loss.contrastive_on
    assert not tmp_path.joinpath("dualssl-smoke").exists()  # prepare writes nothing


def test_every_searched_key_fixed_is_an_error(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"parameters": {"loss.tau": {"type": "uniform", "low": 0.1, "high": 0.5}}}))
    assert main(["--smoke-test", "--storage-path", str(tmp_path), "--search-space", str(space),
                 "--set", "loss.tau=0.2"]) == 2


def test_flag_defaults_do_not_overwrite_the_config_file(tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_sites": ["native_thick"]}, "optim": {"epochs": 3},
                                      "model": {"widths": [8, 16, 32, 64]}}))
    plan = prepare(_args("--config", str(config), "--storage-path", str(tmp_path)))
    assert plan.cfg.data.source_sites == ["native_thick"] and plan.cfg.optim.epochs == 3
    plan = prepare(_args("--config", str(config), "--storage-path", str(tmp_path), "--source-site",
                         "pv_standard,cone_beam", "--epochs", "5"))
    assert plan.cfg.data.source_sites == ["pv_standard", "cone_beam"] and plan.cfg.optim.epochs == 5
    with pytest.raises(ConfigError, match=r"--epochs 5 and --set optim.epochs=4 both set optim.epochs"):
        prepare(_args("--config", str(config), "--storage-path", str(tmp_path), "--epochs", "5",
                      "--set", "optim.epochs=4"))


# --- 6. the domain-shift hook: study.overrides and study.cell --------------------------------------
def test_overrides_apply_after_the_flat_keys_and_round_trip():
    cfg = recipe_config("smoke")
    cell = {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.1, "optim.seed": 7, "data.source_sites": ["native_thick"],
            "study.arm": "restoration"}
    settings = TrialSettings(overrides=cell, cell="restoration/seed7/native_thick")
    flat = {**study_config(cfg, settings, {}), "loss.lambda_con": 0.3}  # a searched value, overridden
    back, back_settings = split_config(flat)
    assert (back.loss.lambda_con, back.loss.lambda_rec, back.optim.seed) == (0.0, 0.1, 7)
    assert back.data.source_sites == ["native_thick"]
    assert back_settings == dataclasses.replace(settings, arm="restoration")  # the label came from the cell
    assert split_config(study_config(back, back_settings, {})) == (back, back_settings)  # round trip
    assert cell_tags(back, back_settings) == {"seed": "7", "source_site": "native_thick", "selection": "source-val",
                                              "arm": "restoration", "cell": "restoration/seed7/native_thick"}
    assert "arm" not in cell_tags(cfg, TrialSettings())
    with pytest.raises(ConfigError, match=r"study.overrides: loss.tauu"):
        split_config({**flat, "study.overrides": {"loss.tauu": 0.1}})
    with pytest.raises(ConfigError, match=r"study.overrides.*loss.tau"):
        split_config({**flat, "study.overrides": {"loss.tau": -1.0}})
    with pytest.raises(ConfigError, match=r"study.overrides: expected a mapping"):
        split_config({**flat, "study.overrides": ["loss.tau=0.1"]})
    with pytest.raises(ConfigError, match=r"study.overrides: only the labels"):
        split_config({**flat, "study.overrides": {"study.workers": 4}})


def test_trial_runs_tag_the_cell(tmp_path):
    import mlflow
    from ray.tune.experiment import Trial

    from studies.tracking import TrialRuns, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "cells", "study-cells", {"seed": "2022", "source_site": SOURCE}, {})
    settings = TrialSettings(overrides={"optim.seed": 3, "data.source_sites": ["cone_beam"], "study.arm": "dual"},
                             cell="dual/3/cone_beam")
    callback = TrialRuns(uri, parent, {"seed": "2022", "source_site": SOURCE})
    callback.setup()
    trial = Trial("__fake", config=study_config(recipe_config("smoke"), settings, {}), trial_id="abc", stub=True)
    callback.log_trial_start(trial)
    [run] = mlflow.MlflowClient(uri).search_runs([mlflow.get_experiment_by_name("cells").experiment_id],
                                                 f"tags.`mlflow.parentRunId` = '{parent}'")
    tags = run.data.tags
    assert (tags["arm"], tags["seed"], tags["source_site"], tags["cell"]) == ("dual", "3", "cone_beam",
                                                                               "dual/3/cone_beam")


def test_a_sqlite_store_keeps_the_artifacts_beside_it(tmp_path, monkeypatch):
    """A sqlite store puts a new experiment's artifacts in ./mlruns of the driver's working folder
    unless told otherwise; a study keeps them beside its mlflow.db."""
    import mlflow

    from studies.tracking import default_tracking, start_parent_run

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "studies" / "s"
    study.mkdir(parents=True)
    uri = default_tracking(study, None)
    assert uri == f"sqlite:///{study / 'mlflow.db'}"
    parent = start_parent_run(uri, "s", "study-s", {}, {})
    mlflow.MlflowClient(uri).log_text(parent, "a table", "trials.csv")
    assert list((study / "mlartifacts").rglob("trials.csv"))
    assert not (tmp_path / "mlruns").exists()
    # a second driver (a resumed study) reopens the experiment where it is
    again = start_parent_run(uri, "s", "study-s", {}, {})
    assert mlflow.get_experiment_by_name("s").artifact_location == (study / "mlartifacts").as_uri()
    assert again != parent
    assert default_tracking(study, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --- 3. ASHA, Optuna and selection speak of the same thing -----------------------------------------
def test_asha_cuts_only_at_validated_epochs_on_the_selection_metric():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from dualssl.engine import Trainer
    from studies.train_loop import ASHA_KEY, RayReport
    from studies.tune import make_scheduler

    assert asha_milestones(10, 2, None) == 4 and asha_milestones(10, 3, 2) == 3
    assert asha_milestones(4, 4, None) is None  # no validated epoch before the last: no ASHA
    cfg = recipe_config("smoke").with_overrides({"optim.epochs": 10, "eval.val_every": 2})
    trainer, report = Trainer(cfg), RayReport()
    scheduler = make_scheduler(cfg, _args("--smoke-test"))
    assert scheduler._brackets[0]._rungs[-1][0] == 4  # rungs 4, 8: validated epochs
    good, bad = Trial("__fake", trial_id="good", stub=True), Trial("__fake", trial_id="bad", stub=True)
    for t in (good, bad):
        scheduler.on_trial_add(None, t)
    actions = {}
    for epoch in range(10):
        measured = (epoch + 1) % 2 == 0
        for t, dice in ((good, 0.8), (bad, 0.1)):
            # as the engine reports: NaN whole-volume Dice on epochs without validation
            metrics = {"val_dice": dice if measured else math.nan, "val_measured": float(measured)}
            result = report.metrics(trainer, epoch, metrics)
            # Tune wants the key in every result: the dice where measured (not at the last epoch), else NaN
            assert result[ASHA_KEY] == dice if measured and epoch < 9 else math.isnan(result[ASHA_KEY])
            if t.trial_id not in actions:
                action = scheduler.on_trial_result(None, t, result)
                if action == TrialScheduler.STOP:
                    actions[t.trial_id] = result["epochs_done"]
    assert actions == {"bad": 4}  # cut at the first rung, a validated epoch, on the selection metric
    assert scheduler._brackets[0]._rungs[-1][1] == {"good": 0.8, "bad": 0.1}  # no NaN recorded at the rung
    scheduler.on_trial_complete(None, good, {**result, ASHA_KEY: math.nan})  # the final report: skipped
    assert "good" not in scheduler._trial_info


def _searcher_with_trial(trial_id: str = "t0"):
    space = study_config(recipe_config("smoke"), TrialSettings(), load_search_space())
    searcher = make_searcher("objective", "max", seed=0, n_startup_trials=1)
    searcher.set_search_properties("objective", "max", space)
    assert searcher.suggest(trial_id)
    return searcher


@pytest.mark.parametrize("last, error, state, value", [
    # stopped by ASHA (no `final`): PRUNED; Optuna keeps its last intermediate value, not the 0.6
    ({"objective": 0.6, "training_iteration": 2}, False, "PRUNED", 0.5),
    ({"objective": 0.7, "training_iteration": 3, FINAL_KEY: 1.0}, False, "COMPLETE", 0.7),
    ({"objective": 0.9, "training_iteration": 2}, True, "FAIL", None),  # errored: its partial score is no result
    ({"objective": math.nan, "training_iteration": 3, FINAL_KEY: 1.0}, False, "FAIL", None),
])
def test_optuna_records_only_finished_trials(last, error, state, value):
    searcher = _searcher_with_trial()
    searcher.on_trial_result("t0", {"objective": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("t0", last, error=error)
    [trial] = searcher._ot_study.trials
    assert trial.state.name == state and trial.value == value
    assert trial.intermediate_values[1] == 0.5


# --- the best checkpoint, not the last -----------------------------------------------------------
def test_best_checkpoint_is_the_best_measured_epoch(tmp_path):
    import ray.train

    from studies.train_loop import SCORE_KEY
    from studies.trainable import best_checkpoint

    reported = [  # epoch 2 is unmeasured (score -1) with a stale high Dice; epoch 3 is the last
        {"epoch": 0, "val_dice": 0.40, SCORE_KEY: 0.40},
        {"epoch": 1, "val_dice": 0.75, SCORE_KEY: 0.75 - 1e-9},
        {"epoch": 2, "val_dice": 0.95, SCORE_KEY: -1.0},
        {"epoch": 3, "val_dice": 0.60, SCORE_KEY: 0.60 - 3e-9},
    ]
    pairs = []
    for m in reported:
        folder = tmp_path / f"epoch_{m['epoch']:04d}"
        folder.mkdir()
        (folder / "marker.txt").write_text(str(m["epoch"]))
        pairs.append((ray.train.Checkpoint.from_directory(str(folder)), m))
    result = ray.train.Result(metrics=reported[-1], checkpoint=pairs[-1][0], error=None, path=str(tmp_path),
                              best_checkpoints=pairs)
    best, metrics = best_checkpoint(result)
    assert metrics["epoch"] == 1 and Path(best.path).name == "epoch_0001"


# --- errored trials never win nor get exported ---------------------------------------------------
def _completed_result(folder: Path, trial_id: str, objective: float, config: dict):
    import ray.tune

    folder.mkdir(parents=True)
    (folder / "trial.json").write_text(json.dumps({"trial_id": trial_id, "best_checkpoint": str(folder),
                                                   "worst_site": "cone_beam"}))
    metrics = {"trial_id": trial_id, FINAL_KEY: 1.0, "objective": objective, "best_val_dice": objective,
               "best_epoch": 1, "epochs_done": 2, "mean_unseen_dice": 0.5, "oracle/mean_unseen_dice": 0.55,
               "site/cone_beam/dice_mean": 0.5, "config": config}
    return ray.tune.Result(metrics=metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(folder)),
                           error=None, path=str(folder.parent / f"trial_{trial_id}"))


def test_errored_trial_never_wins_nor_is_exported(tmp_path):
    import mlflow
    import ray.tune

    from studies.export_best import best_row
    from studies.finish import finish_study, pick_best
    from studies.tracking import start_parent_run

    config = study_config(recipe_config("smoke"), TrialSettings(train_storage=str(tmp_path / "runs")),
                          {})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "errored", "study-errored", {"role": "study"}, {})
    grid = [
        _completed_result(tmp_path / "ckpt" / "ok", "ok", 0.61, config),
        _completed_result(tmp_path / "ckpt" / "ok2", "ok2", 0.42, config),
    ]
    # reported its final result with a higher objective, then failed: must not compete
    boom = _completed_result(tmp_path / "ckpt" / "boom", "boom", 0.99, config)
    grid.append(ray.tune.Result(metrics=boom.metrics, checkpoint=boom.checkpoint, error=RuntimeError("worker died"),
                                path=boom.path))
    manifest = {"study_dir": str(tmp_path), "tracking_uri": uri, "parent_run_id": parent, "selection": "source-val",
                "searched": []}
    summary = finish_study(grid, manifest, export=False)
    rows = {r["trial_id"]: r for r in summary["rows"]}
    assert summary["best_trial_id"] == "ok" and rows["ok"]["objective"] == 0.61
    assert rows["boom"]["status"] == "error" and math.isnan(rows["boom"]["objective"])
    assert "worker died" in rows["boom"]["error"]
    assert rows["ok"]["metrics"]["oracle/mean_unseen_dice"] == 0.55  # oracle numbers kept, under their prefix
    table = json.loads((tmp_path / "trials.json").read_text())
    assert best_row(table)["trial_id"] == "ok"  # what export_best would export
    assert mlflow.MlflowClient(uri).get_run(parent).data.tags["best_trial_id"] == "ok"
    assert pick_best([{**rows["boom"], "objective": 0.99}, rows["ok2"]])["trial_id"] == "ok2"
    assert pick_best([{"trial_id": "s", "status": "stopped early (ASHA)", "objective": 0.9}]) is None


# --- 4. fail fast, before any trial starts -------------------------------------------------------
def test_broken_dataset_is_refused_before_anything_starts(phantom_root, tmp_path):
    root = _copy(phantom_root, tmp_path / "broken")
    test_case = next(e for e in _cases(root) if e["site"] == "cone_beam")
    truncated = (root / test_case["image"]).resolve()
    truncated.write_bytes(truncated.read_bytes()[:3000])
    storage, temp = tmp_path / "studies", tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(REPO / "studies" / "tune.py"), "--smoke-test", "--data", str(root),
                           "--source-site", f"{SOURCE},hospital_z", "--storage-path", str(storage)],
                          env={**env, "TMPDIR": str(temp), "RAY_TMPDIR": str(temp)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    err = done.stderr
    assert err.count("studies/tune.py: error:") == 1 and "nothing was started" in err
    assert str(truncated) in err and "truncated or corrupt" in err  # a TEST site's file
    assert "unknown source site 'hospital_z'" in err and "cone_beam, native_thick, pv_standard" in err
    assert not storage.exists()  # no study folder, so no mlflow.db
    assert not list(temp.iterdir()), list(temp.iterdir())  # no Ray session, no head log


def test_small_source_site_and_mismatched_label_are_refused(phantom_root, tmp_path, capsys):
    root = _copy(phantom_root, tmp_path / "small")
    tree = json.loads((root / "dataset.json").read_text())
    keep = next(e for e in tree["training"] if e["site"] == SOURCE)
    tree["training"] = [e for e in tree["training"] if e["site"] != SOURCE or e is keep]
    (root / "dataset.json").write_text(json.dumps(tree))
    label = (root / next(e for e in tree["training"] if e["site"] == "native_thick")["label"]).resolve()
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.pad(np.asanyarray(img.dataobj), ((0, 0), (0, 0), (0, 2))), img.affine), str(label))
    storage = tmp_path / "studies"
    assert main(["--smoke-test", "--data", str(root), "--storage-path", str(storage)]) == 2
    err = capsys.readouterr().err
    assert f"source site '{SOURCE}' has 1 usable case(s)" in err and f"FATAL {label}: label shape" in err
    assert not storage.exists()


def test_relative_cache_dir_is_resolved_and_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = prepare(_args("--smoke-test", "--storage-path", str(tmp_path / "s"), "--set", "data.cache_dir=cache"))
    assert plan.cfg.data.cache_dir == str(tmp_path / "cache")
    assert any(str(tmp_path / "cache") in n for n in plan.notes)


def test_demo_validates_on_at_least_two_cases_of_the_default_phantom():
    from dualssl.data.datalist import Case, split_cases

    cfg = recipe_config("demo")
    cases = [Case(f"c{i}", f"/x/{i}.nii.gz", f"/y/{i}.nii.gz", "pv_standard") for i in range(5)]
    split = split_cases(cases, ["pv_standard"], cfg.data.val_fraction, cfg.data.split_seed)
    assert len(split.val) == 2 and len(split.train) == 3


# --- no leakage: the test sites never reach the source-val objective ------------------------------
def _selection_inputs(root: Path, cache: Path) -> dict:
    """Everything a source-val objective is computed from: the split, the first training batch, the
    whole validation volumes and the patch-validation Dice of the seeded initial net."""
    import torch

    from dualssl.engine import Trainer

    cfg = Config().with_overrides({**TINY, "optim.epochs": 1, "optim.steps_per_epoch": 1, "data.root": str(root),
                                   "data.source_sites": [SOURCE], "data.cache_dir": str(cache)})
    trainer = Trainer(cfg, device="cpu")
    trainer.setup()
    split = trainer.data.split
    volumes = [trainer.data.val_volumes[i] for i in range(len(trainer.data.val_volumes))]
    return {"train": [c.case_id for c in split.train], "val": [c.case_id for c in split.val],
            "batch": torch.as_tensor(next(iter(trainer.train_loader))["image"]).clone(),
            "volumes": [(v["case_id"], torch.as_tensor(v["image"]).clone(), torch.as_tensor(v["label"]).clone())
                        for v in volumes],
            "patch_dice": trainer.validate_patches(), "net": trainer.net.state_dict()}


def test_test_site_images_do_not_change_the_source_val_objective(phantom_root, tmp_path):
    import torch

    noisy = _copy(phantom_root, tmp_path / "noisy")
    rng = np.random.default_rng(0)
    replaced = 0
    for entry in _cases(noisy):
        if entry["site"] != SOURCE:
            path = (noisy / entry["image"]).resolve()
            img = nib.load(path)
            nib.save(nib.Nifti1Image(rng.uniform(-1000, 1000, img.shape).astype(np.float32), img.affine), str(path))
            replaced += 1
    assert replaced == 10
    clean = _selection_inputs(phantom_root, tmp_path / "cache_clean")
    perturbed = _selection_inputs(noisy, tmp_path / "cache_noisy")
    assert clean["train"] == perturbed["train"] and clean["val"] == perturbed["val"] and len(clean["val"]) == 1
    assert all(c.startswith(SOURCE) for c in clean["train"] + clean["val"])
    assert torch.equal(clean["batch"], perturbed["batch"])
    assert len(clean["volumes"]) == len(perturbed["volumes"]) == 1
    for (cid, img, lab), (pid, pimg, plab) in zip(clean["volumes"], perturbed["volumes"]):
        assert cid == pid and torch.equal(img, pimg) and torch.equal(lab, plab)
    assert all(torch.equal(clean["net"][k], perturbed["net"][k]) for k in clean["net"])
    assert clean["patch_dice"] == perturbed["patch_dice"] or (math.isnan(clean["patch_dice"])
                                                              and math.isnan(perturbed["patch_dice"]))


def test_both_studies_refuse_a_scan_listed_at_two_sites_naming_both_files(phantom_root, tmp_path):
    from studies import domain_shift

    root = _copy(phantom_root, tmp_path / "dup")
    tree = json.loads((root / "dataset.json").read_text())
    source = next(e for e in tree["training"] if e["site"] == SOURCE)
    original = (root / source["image"]).resolve()
    copy = root / "imagesTr" / "cone_beam_777.nii.gz"  # the source patient again, renamed, at a test site
    shutil.copy(original, copy)
    shutil.copy((root / source["label"]).resolve(), root / "labelsTr" / "cone_beam_777.nii.gz")
    tree["training"].append({"image": "./imagesTr/cone_beam_777.nii.gz", "label": "./labelsTr/cone_beam_777.nii.gz",
                             "site": "cone_beam"})
    (root / "dataset.json").write_text(json.dumps(tree))
    storage = tmp_path / "studies"
    with pytest.raises(ConfigError) as tune_err:
        prepare(_args("--smoke-test", "--data", str(root), "--storage-path", str(storage)))
    with pytest.raises(ConfigError) as shift_err:
        domain_shift.prepare(domain_shift.build_parser().parse_args(
            ["--smoke-test", "--data", str(root), "--storage-path", str(storage)]))
    for err in (tune_err, shift_err):
        text = str(err.value)
        assert "nothing was started" in text and "identical voxel data" in text
        assert str(copy.resolve()) in text and str(original) in text, text
    assert not storage.exists()
