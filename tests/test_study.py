"""The Ray study: search space, resource checks, and (slow) real studies on a loopback Ray head
with a real MLflow sqlite store: smoke study with an injected worker failure, cross-site metrics
in one MLflow run per trial, the exported model reproducing the reported validation Dice.
``ray job submit`` of the smoke study runs on a two-node cluster in tests/test_multinode.py, and a
killed and resumed driver in tests/test_driver_resume.py.

One Ray head (``ray start --head --block`` on 127.0.0.1, token authentication, 2 CPUs) serves every
slow test; it is stopped by killing the process group this module started (never `ray stop`,
which would stop every Ray node on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.config import Config, ConfigError  # noqa: E402
from studies.resources import ResourceError, StudyResources, check_resources  # noqa: E402
from studies.search_space import DEFAULT_SEARCH_SPACE, load_search_space, read_search_space  # noqa: E402
from studies.trainable import TrialSettings, split_config, study_config  # noqa: E402

UNSEEN = ["cone_beam", "native_thick"]  # conftest TEST_SITES minus the source site


# --- fast: search space, resources, trial config -------------------------------------------------
def test_default_search_space_uses_dotted_names_and_log_scale():
    from ray.tune.search.sample import LogUniform

    spec = read_search_space()
    assert set(spec) == {"loss.lambda_con", "loss.lambda_rec", "loss.corruption_ratio", "loss.tau"}
    domains = load_search_space()
    for name in ("loss.lambda_con", "loss.lambda_rec", "loss.tau"):
        assert isinstance(domains[name].get_sampler(), LogUniform), name
    assert domains["loss.corruption_ratio"].lower >= 0 and domains["loss.corruption_ratio"].upper <= 1


@pytest.mark.parametrize("params, message", [
    ({"loss.lamda_con": {"type": "uniform", "low": 0.1, "high": 1}}, "loss.lamda_con"),
    ({"loss.corruption_ratio": {"type": "uniform", "low": 0.1, "high": 1.5}}, "must lie in"),
    ({"loss.tau": {"type": "loguniform", "low": 0, "high": 1}}, "low > 0"),
    ({"loss.tau": {"type": "normal", "low": 0.1, "high": 1}}, "type"),
])
def test_search_space_errors_name_the_file_and_parameter(tmp_path, params, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"parameters": params}))
    with pytest.raises(ConfigError, match=message) as info:
        read_search_space(path)
    assert str(path) in str(info.value)


def test_resource_check_says_what_to_change():
    cluster = {"CPU": 2.0}
    check_resources(StudyResources(1, 2, 1.0), cluster, [cluster])  # fits exactly
    with pytest.raises(ResourceError, match="--max-concurrent-trials 1"):
        check_resources(StudyResources(2, 2, 1.0), cluster)
    with pytest.raises(ResourceError, match="--gpus-per-worker 0"):
        check_resources(StudyResources(1, 1, 1.0, gpus_per_worker=1.0), cluster)
    with pytest.raises(ResourceError, match="--workers-per-trial 2"):
        check_resources(StudyResources(1, 4, 1.0), cluster)
    with pytest.raises(ResourceError, match="single node"):
        check_resources(StudyResources(1, 1, 3.0), {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    gpu_cluster = {"CPU": 32.0, "GPU": 4.0}
    with pytest.raises(ResourceError, match="--max-concurrent-trials 2"):
        check_resources(StudyResources(3, 2, 4.0, 1.0), gpu_cluster)


def test_trial_config_round_trips_every_dotted_field():
    cfg = Config().with_overrides({"model.widths": (8, 16, 32, 64), "loss.tau": 0.2})
    settings = TrialSettings(workers=2, train_storage="/abs/runs", selection="oracle",
                             overrides={"loss.tau": 0.3}, cell="a/0")
    flat = study_config(cfg, settings, {})
    assert flat["loss.tau"] == 0.2 and flat["study.workers"] == 2
    back, back_settings = split_config(flat)
    assert back.loss.tau == 0.3 and back_settings == settings  # overrides win over the flat keys
    assert back.hash() == cfg.with_overrides({"loss.tau": 0.3}).hash()
    with pytest.raises(ValueError, match="study.worker"):
        split_config({**flat, "study.worker": 1})


def test_cli_refuses_a_relative_storage_path(capsys):
    from studies.tune import main

    assert main(["--smoke-test", "--storage-path", "relative/dir"]) == 2
    assert "absolute path" in capsys.readouterr().err


# --- slow: a real Ray head on the loopback interface ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU Ray head on 127.0.0.1 with token auth; yields (gcs address, dashboard URL, env)."""
    port, dash = _free_port(), _free_port()
    # Ray's local clusters use token authentication: the head, the job CLI and every driver
    # need the same token (here in the environment instead of ~/.ray/auth_token).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp = tmp_path_factory.mktemp("ray")
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            # Ready once the head accepts a job: `ray job list` answers before the job agent has
            # registered, and a submission then fails with "No available agent to submit job".
            ready = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--", "true"],
                                   env=env, capture_output=True, timeout=60)
            if ready.returncode == 0:
                break
            time.sleep(3)
        else:
            pytest.fail(f"the Ray head did not come up: {(temp / 'head.log').read_text()[-2000:]}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env
    finally:
        # The head and everything it spawned share the process group this fixture created.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # gcs_server and the dashboard ignore SIGTERM
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        log.close()
        from studies.local_cluster import forget_head

        forget_head(port)


def _tune(env: dict, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``python studies/tune.py ARGS`` as a user runs it, with the head's token in its environment."""
    return subprocess.run([sys.executable, str(REPO / "studies" / "tune.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _study_args(root: Path, storage: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--data", str(root), "--storage-path", str(storage),
            "--set", f"data.cache_dir={storage / 'cache'}", *extra]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_smoke_study_with_a_killed_worker(ray_head, phantom_root, tmp_path):
    import mlflow

    from studies.export_best import validation_dice

    address, _, env = ray_head
    storage = tmp_path / "studies"
    done = _tune(env, *_study_args(phantom_root, storage, "--address", address, "--num-samples", "2",
                                   "--fail-at-epoch", "0"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout and "Exported model:" in done.stdout
    study = storage / "dualssl-smoke"
    rows = json.loads((study / "trials.json").read_text())
    summary = json.loads((study / "export.json").read_text())
    assert len(rows) == 2
    # The winner: the completed trial with the highest objective, which for source-val selection is
    # its best source-validation Dice.
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and summary["best_trial_id"] == max(completed, key=lambda r: r["objective"])["trial_id"]
    for r in completed:
        assert r["objective"] == r["metrics"]["best_val_dice"] and 0.0 <= r["objective"] <= 1.0

    # MLflow: one parent, exactly one child run per trial despite the worker restart.
    manifest = json.loads((study / "study.json").read_text())
    client = mlflow.MlflowClient(manifest["tracking_uri"])
    parent = client.get_run(manifest["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    by_trial = {r["trial_id"]: r for r in rows}
    for run in children:
        row = by_trial[run.data.tags["trial_id"]]
        # the trial table and MLflow hold the same numbers
        assert run.data.metrics["objective"] == pytest.approx(row["objective"], abs=1e-12)
        assert run.data.metrics["mean_unseen_dice"] == pytest.approx(row["metrics"]["mean_unseen_dice"], abs=1e-12)
        assert "oracle/mean_unseen_dice" in run.data.metrics  # a source-val study logs the oracle numbers too
        for site in UNSEEN:
            for key in ("dice_mean", "dice_std", "hd95_mean", "hd95_std", "asd_mean", "asd_std"):
                assert f"site/{site}/{key}" in run.data.metrics, (run.info.run_name, site, key)
        for key in ("mean_unseen_dice", "worst_site_dice", "std_across_sites", "stability"):
            assert key in run.data.metrics
        assert {"loss.lambda_con", "loss.lambda_rec", "loss.corruption_ratio", "loss.tau"} <= set(run.data.params)
        assert run.data.tags["source_site"] == "pv_standard" and run.data.tags["selection"] == "source-val"
        assert run.data.tags["config_hash"] and "git_revision" in run.data.tags
        assert run.info.run_name == f"trial_{run.data.tags['trial_id']}"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "trial")} >= {
            "trial/per_case.csv", "trial/progress.png", "trial/config.yaml"}
    assert parent.data.tags["best_trial_id"] == summary["best_trial_id"]
    # The study's Optuna journal: one Optuna trial per Tune trial, each ended (never left RUNNING).
    import optuna

    from studies.search_space import optuna_storage

    assert manifest["optuna_storage"] == str(study / "optuna.journal")
    ot = optuna.load_study(study_name="dualssl-smoke", storage=optuna_storage(manifest["optuna_storage"]))
    assert len(ot.trials) == len(rows) and all(t.state.is_finished() for t in ot.trials)
    assert f"optuna-dashboard {study / 'optuna.journal'}" in done.stdout
    # Each trial's run names its dataset; the parent says what the study was.
    for run in children:
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert json.loads(dataset.source)["uri"] == str(phantom_root)
        assert json.loads(dataset.profile)["sites"]["pv_standard"]["train"] >= 1
    assert "trained on source site(s) pv_standard" in parent.data.tags["mlflow.note.content"]
    # The terminal: Tune's table, no per-worker Train lines (they stay in Ray's log files).
    printed = done.stdout + done.stderr
    assert "Reporting training result" not in printed and "Checkpoint successfully created" not in printed
    assert "Trial name" in done.stdout and "val Dice" in done.stdout
    for noise in ("NaN or Inf found in input tensor", "may be a performance bottleneck",
                  "Creating initial MLflow database tables", "Add type hints", "Downloading artifacts"):
        assert noise not in printed, noise
    assert not list((storage / "dualssl-smoke").rglob("events.out.tfevents*"))  # no TensorBoard logger
    # Where each completed trial's time went, in its run (studies/throughput.py).
    timed = [r.data.metrics for r in children if "time/trial_s" in r.data.metrics]
    assert timed and all(m["time/train_s"] > 0 and m["time/crosssite_s"] > 0 for m in timed)
    for m in timed:
        parts = ("startup", "train", "validation", "checkpoint", "crosssite", "other")
        assert abs(sum(m[f"time/{p}_frac"] for p in parts) - 1.0) < 1e-6
    assert parent.data.tags["selection"] == "source-val"
    assert parent.data.tags["selection_metric"].startswith("val_dice (source validation")

    # The killed worker: every trial lost a worker once after epoch 0 and resumed from epoch 1.
    for row in rows:
        run_dir = storage / "dualssl-smoke" / "train_runs" / f"train_{row['trial_id']}"
        assert (run_dir / ".fault_injected").is_file()
    resumed = [client.get_metric_history(r.info.run_id, "resumed_from_epoch") for r in children]
    assert any(m.value == 1 for history in resumed for m in history)
    assert all(max(m.value for m in history) <= 1 for history in resumed)

    # The export reproduces the best trial's reported validation Dice on the same cases.
    best = next(r for r in rows if r["trial_id"] == summary["best_trial_id"])
    assert abs(validation_dice(summary["model_dir"]) - best["metrics"]["best_val_dice"]) < 1e-3
    assert summary["registered_uri"] == "models:/dualssl-pancreas@champion"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_study_refuses_resources_the_cluster_lacks(ray_head, phantom_root, tmp_path):
    address, _, env = ray_head
    args = _study_args(phantom_root, tmp_path, "--address", address)
    # Two trials of 2 workers x 1 CPU on a 2-CPU head would wait forever: refused with the fix.
    done = _tune(env, *args, "--max-concurrent-trials", "2", "--workers-per-trial", "2", timeout=100)
    assert done.returncode == 2 and "--max-concurrent-trials 1" in done.stderr
    assert not (tmp_path / "dualssl-smoke" / "trials.json").exists()
