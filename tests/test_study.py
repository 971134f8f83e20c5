"""The Ray study: search space, resource checks, and (slow) one real study on a loopback Ray head
that the slow tests share: 8 trials 3 at a time, two objectives, an injected worker failure in
every trial, logged to a real ``mlflow server`` on PostgreSQL; cross-site metrics in one MLflow run
per trial, one metric row per reported epoch, a non-dominated Pareto front, parameter importance,
the exported model reproducing the reported validation Dice.
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
from studies.search_space import load_search_space, read_search_space  # noqa: E402
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
            try:
                ready = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--", "true"],
                                       env=env, capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:  # a busy machine: ask again until the deadline
                continue
            if ready.returncode == 0:
                break
            time.sleep(3)
        else:
            pytest.fail(f"the Ray head did not come up: {(temp / 'head.log').read_text()[-2000:]}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env
    finally:
        # The head and everything it spawned share the process group this fixture created.
        from studies.local_cluster import forget_head, stop_group

        stop_group(head)
        head.wait(timeout=30)
        log.close()
        forget_head(port)


def _tune(env: dict, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``python studies/tune.py ARGS`` as a user runs it, with the head's token in its environment."""
    return subprocess.run([sys.executable, str(REPO / "studies" / "tune.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _study_args(root: Path, storage: Path, *extra: str) -> list[str]:
    return ["--smoke-test", "--data", str(root), "--storage-path", str(storage),
            "--set", f"data.cache_dir={storage / 'cache'}", *extra]


NUM_SAMPLES, AT_ONCE = 8, 3
STUDY_FLAGS = ("--num-samples", str(NUM_SAMPLES), "--max-concurrent-trials", str(AT_ONCE), "--workers-per-trial", "1",
               "--cpus-per-worker", "0.5", "--objectives", "val_dice,val_stability",
               # 2 of the 5 source cases validate: val_stability is a std over them
               "--set", "data.val_fraction=0.4", "--fail-at-epoch", "0", "--fail-scope", "study")
"""The study every slow test of this module reads: 8 trials, 3 at a time (1 worker of half a CPU each
on the 2-CPU head), two objectives, the worker of the first trial to finish epoch 0 killed, logged over HTTP
to the PostgreSQL-backed ``mlflow server`` (the sqlite default where PostgreSQL is absent outside CI)."""


@pytest.fixture(scope="module")
def smoke_study(ray_head, phantom_root, study_tracking, tmp_path_factory):
    """The study above, run once with ``python studies/tune.py``; yields what the tests read."""
    import mlflow

    address, dashboard, env = ray_head
    storage = tmp_path_factory.mktemp("smoke-study") / "studies"
    tracking = ["--mlflow-tracking-uri", study_tracking["uri"]] if study_tracking else []
    started = time.time()
    done = _tune(env, *_study_args(phantom_root, storage, "--address", address, *STUDY_FLAGS, *tracking), timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    study = storage / "dualssl-smoke"
    manifest = json.loads((study / "study.json").read_text())
    client = mlflow.MlflowClient(manifest["tracking_uri"])
    parent = client.get_run(manifest["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    print(f"\n[smoke study] {NUM_SAMPLES} trials, {AT_ONCE} at a time: {time.time() - started:.0f} s")
    yield {"done": done, "study": study, "storage": storage, "manifest": manifest, "client": client,
           "parent": parent, "children": children, "rows": json.loads((study / "trials.json").read_text()),
           "summary": json.loads((study / "export.json").read_text()), "dashboard": dashboard, "env": env}


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_smoke_study_logs_each_trial_once_with_its_cross_site_numbers(smoke_study, phantom_root):
    done, study, rows, client = smoke_study["done"], smoke_study["study"], smoke_study["rows"], smoke_study["client"]
    parent, children, manifest = smoke_study["parent"], smoke_study["children"], smoke_study["manifest"]
    assert "mlflow ui --backend-store-uri " in done.stdout and "Exported model:" in done.stdout
    assert len(rows) == NUM_SAMPLES
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and {r["status"] for r in rows} <= {"completed", "stopped early (ASHA)"}
    for r in completed:
        assert r["objective"] == r["metrics"]["best_val_dice"] and 0.0 <= r["objective"] <= 1.0

    # MLflow: one parent, exactly one child run per trial despite the worker restarts.
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
        assert run.info.run_name == f"trial_{run.data.tags['trial_id']}" and run.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(run.info.run_id, "trial")} >= {
            "trial/per_case.csv", "trial/progress.png", "trial/config.yaml"}
        # Each trial's run names its dataset.
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert json.loads(dataset.source)["uri"] == str(phantom_root)
        assert json.loads(dataset.profile)["sites"]["pv_standard"]["train"] >= 1
    assert parent.data.tags["best_trial_id"] == smoke_study["summary"]["best_trial_id"]
    assert "trained on source site(s) pv_standard" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["selection"] == "source-val"
    assert parent.data.tags["selection_metric"].startswith("val_dice (source validation")
    # The study's Optuna journal: one Optuna trial per Tune trial, each ended (never left RUNNING).
    import optuna

    from studies.search_space import optuna_storage

    assert manifest["optuna_storage"] == str(study / "optuna.journal")
    ot = optuna.load_study(study_name="dualssl-smoke", storage=optuna_storage(manifest["optuna_storage"]))
    assert len(ot.trials) == len(rows) and all(t.state.is_finished() for t in ot.trials)
    assert f"optuna-dashboard {study / 'optuna.journal'}" in done.stdout
    # Where each completed trial's time went, in its run (studies/throughput.py).
    timed = [r.data.metrics for r in children if "time/trial_s" in r.data.metrics]
    assert timed and all(m["time/train_s"] > 0 and m["time/crosssite_s"] > 0 for m in timed)
    for m in timed:
        parts = ("startup", "train", "validation", "checkpoint", "crosssite", "other")
        assert abs(sum(m[f"time/{p}_frac"] for p in parts) - 1.0) < 1e-6
    # the start-up split at the train loop's entry (all but the killed trial, whose last worker group
    # started after its first epoch)
    split = [m for m in timed if "time/startup_workers_s" in m]
    assert len(split) >= len(timed) - 1
    for m in split:
        assert m["time/startup_workers_s"] > 0 and m["time/startup_setup_s"] > 0
        assert m["time/startup_workers_s"] + m["time/startup_setup_s"] == pytest.approx(m["time/startup_s"])


@pytest.mark.slow
def test_smoke_study_preprocesses_each_case_once_before_any_trial_and_its_trials_only_read(smoke_study, phantom_root):
    """The driver's one pass (studies/preprocess.py) into the study's fresh cache: one file per case a trial
    reads or evaluates (the source site's training and validation cases, every unseen case), every file written before the first trial
    started and none written or touched by the 8 trials (the restarted one included) since.
    tests/test_preprocess_pass.py checks a second pass and an edited scan."""
    import re

    from dualssl.data.datalist import load_datalist, split_cases

    done, study, storage = smoke_study["done"], smoke_study["study"], smoke_study["storage"]
    cfg = Config()
    split = split_cases(load_datalist(phantom_root), cfg.data.source_sites, 0.4, cfg.data.split_seed)
    unseen = sum(len(v) for v in split.test.values())  # the cross-site evaluation's cases are cached too
    cases = len(split.train) + len(split.val) + unseen
    line = re.search(r"preprocessing: (\d+) of (\d+) case\(s\) written .*trials read (\S+)", done.stdout)
    assert line, done.stdout[-3000:]
    assert (int(line[1]), int(line[2])) == (cases, cases)
    folder = Path(line[3])
    assert folder.parent == storage / "cache"
    files = {p: p.stat().st_mtime_ns for p in (storage / "cache").rglob("*") if p.is_file()}
    assert sorted(p.name for p in files) == sorted(p.name for p in folder.iterdir())  # nothing else in the cache
    assert len(files) == cases and all(p.suffix == ".pt" for p in files), sorted(files)
    starts = [json.loads(line).get("trial_start_unix") for result in study.glob("trial_*/result.json")
              for line in result.read_text().splitlines() if line.strip()]
    starts = [s for s in starts if s is not None]
    assert len(set(starts)) >= len(smoke_study["rows"])  # a start of every trial
    first_trial = min(starts)
    late = {p.name: m / 1e9 - first_trial for p, m in files.items() if m / 1e9 >= first_trial}
    assert not late, f"cache files written after the first trial started (s after): {late}"
    # every trial's cross-site evaluation took each image (source validation and unseen) from that cache
    # (per evaluated trial: its selection part oracle_summary.json + its report part summary.json)
    evaluated = {p.parent for p in storage.rglob("oracle_summary.json")}
    assert evaluated, sorted(str(p) for p in storage.rglob("*summary.json"))
    for folder in evaluated:
        hits = sum(json.loads((folder / name).read_text())["settings"]["preprocessed_from_cache"]
                   for name in ("summary.json", "oracle_summary.json"))
        assert hits == len(split.val) + unseen, folder


@pytest.mark.slow
def test_smoke_study_prints_only_what_a_user_needs(smoke_study):
    done, storage = smoke_study["done"], smoke_study["storage"]
    printed = done.stdout + done.stderr
    assert "Reporting training result" not in printed and "Checkpoint successfully created" not in printed
    assert "Trial name" in done.stdout and "val Dice" in done.stdout
    for noise in ("NaN or Inf found in input tensor", "may be a performance bottleneck",
                  "Creating initial MLflow database tables", "Add type hints", "Downloading artifacts",
                  "database is locked"):
        assert noise not in printed, noise
    assert not list(storage.rglob("events.out.tfevents*"))  # no TensorBoard logger


@pytest.mark.slow
def test_smoke_study_restarts_killed_workers_and_exports_what_it_reported(smoke_study):
    from studies.export_best import validation_dice

    rows, client, children, summary = (smoke_study[k] for k in ("rows", "client", "children", "summary"))
    # One worker was killed after epoch 0: its trial (named in the marker) resumed from epoch 1 in
    # the same run; every other trial trained start to end.
    marker = (smoke_study["study"] / "train_runs" / ".fault_injected").read_text()
    killed = marker.split(": ")[-1].strip().removeprefix("train_")
    assert killed in {r["trial_id"] for r in rows}, marker
    status = {r["trial_id"]: r["status"] for r in rows}
    for run in children:
        resumed = {m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")}
        if run.data.tags["trial_id"] != killed:
            assert resumed == {0.0}, (run.info.run_name, resumed)
        elif status[killed] == "completed":  # (the first trial at ASHA's rung is never cut there)
            assert resumed == {0.0, 1.0}, (run.info.run_name, resumed)
    # The export reproduces the exported trial's reported validation Dice on the same cases.
    best = next(r for r in rows if r["trial_id"] == summary["best_trial_id"])
    assert abs(validation_dice(summary["model_dir"]) - best["metrics"]["best_val_dice"]) < 1e-3
    assert summary["registered_uri"] == "models:/dualssl-pancreas-smoke@champion"  # never a user's model


@pytest.mark.slow
def test_evaluate_model_reproduces_the_per_case_dice_the_study_logged_for_its_exported_trial(smoke_study, phantom_root,
                                                                                             tmp_path):
    """`dualssl evaluate --model` on the study's export and on its registry URI: every case of the
    exported trial's logged per_case.csv (source validation + unseen report part) gets the same Dice."""
    import csv

    from dualssl.cli import main

    rows, client, summary = smoke_study["rows"], smoke_study["client"], smoke_study["summary"]
    best = next(r for r in rows if r["trial_id"] == summary["best_trial_id"])
    logged = Path(client.download_artifacts(best["run_id"], "trial/per_case.csv", str(tmp_path / "logged")))
    with open(logged) as fh:
        reported = {r["case_id"]: float(r["dice"]) for r in csv.DictReader(fh)}
    os.environ["MLFLOW_TRACKING_URI"] = smoke_study["manifest"]["tracking_uri"]
    try:
        for source in (summary["model_dir"], summary["registered_uri"]):
            out = tmp_path / source.replace("/", "_").replace(":", "_").replace("@", "_")
            assert main(["evaluate", "--model", source, "--data", str(phantom_root), "--sites",
                         ",".join(["pv_standard", *UNSEEN]), "--out", str(out)]) == 0
            with open(out / "per_case.csv") as fh:
                ours = {r["case_id"]: float(r["dice"]) for r in csv.DictReader(fh)}
            assert set(reported) <= set(ours)  # evaluate takes every unseen case, the study its report part
            for case_id, dice in reported.items():
                assert ours[case_id] == pytest.approx(dice, abs=1e-6), case_id
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.mark.slow
def test_two_objective_study_logs_a_non_dominated_front_and_importance_of_every_parameter(smoke_study, tmp_path):
    """The Pareto front in the parent run, recomputed here from each trial's own per-case Dice."""
    import csv
    import statistics

    client, parent, rows = smoke_study["client"], smoke_study["parent"], smoke_study["rows"]
    local = Path(client.download_artifacts(parent.info.run_id, "search", str(tmp_path)))
    assert {"pareto.json", "pareto.png", "importance.json", "importance.png"} <= {p.name for p in local.iterdir()}
    front = json.loads((local / "pareto.json").read_text())
    assert front["objectives"] == {"val_dice": "max", "val_stability": "min"}

    # Both objectives of every completed trial, from its own artifacts: val_dice its best source
    # validation Dice, val_stability the sample std of its source-validation cases' Dice.
    values = {}
    for row in rows:
        if row["status"] != "completed":
            continue
        with open(Path(row["artifacts"]) / "per_case.csv") as fh:
            source = [float(r["dice"]) for r in csv.DictReader(fh) if r["role"] == "source"]
        assert len(source) == 2
        values[row["trial_id"]] = (row["metrics"]["best_val_dice"], statistics.stdev(source))
    points = {p["trial_id"]: p for p in front["points"]}
    assert set(points) == set(values)
    for trial, (dice, stability) in values.items():
        assert points[trial]["val_dice"] == pytest.approx(dice, abs=1e-9)
        assert points[trial]["val_stability"] == pytest.approx(stability, abs=1e-9)

    def dominates(a, b):  # higher Dice, lower instability
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    expected = {t for t, v in values.items() if not any(dominates(w, v) for w in values.values())}
    assert set(front["front"]) == expected and all(points[t]["on_front"] == (t in expected) for t in points)
    # The exported point: the best Dice within 0.01 of the front's top, then the lowest instability.
    top = max(values[t][0] for t in expected)
    near = [t for t in expected if values[t][0] >= top - 0.01]
    assert front["chosen"] == min(near, key=lambda t: values[t][1]) == smoke_study["summary"]["best_trial_id"]

    # Importance of every searched parameter for each objective, in the parent run.
    importance = json.loads((local / "importance.json").read_text())
    searched = set(smoke_study["manifest"]["searched"])
    assert set(importance["importances"]) == {"val_dice", "val_stability"}
    for objective, table in importance["importances"].items():
        assert set(table) == searched and all(v >= 0 and v == v for v in table.values()), (objective, table)


@pytest.mark.slow
def test_concurrent_trials_leave_one_run_and_one_row_per_epoch_on_the_tracking_server(smoke_study, study_tracking,
                                                                                        tmp_path):
    """8 trials, 3 at a time, against the server: every result Tune wrote (its result.json, written
    by Tune's JSON logger, not by MLflow) is one metric row; the parent holds the full table; no
    duplicate experiment; no placement group left on the cluster."""
    from studies.throughput import epoch_breakdown

    client, parent, children, study = (smoke_study[k] for k in ("client", "parent", "children", "study"))
    spans, expected_rows = [], {}
    for run in children:
        trial = run.data.tags["trial_id"]
        results = [json.loads(line) for line in (study / f"trial_{trial}" / "result.json").read_text().splitlines()]
        iterations = [r["training_iteration"] for r in results]
        # every epoch carries the trial function's start, so a stopped trial's start-up splits too
        assert all(r["trial_start_unix"] <= r["loop_start_unix"] <= r["epoch_start_unix"]
                   for r in results if "epoch_start_unix" in r), trial
        assert "time/startup_workers_s" in epoch_breakdown(results), trial
        history = client.get_metric_history(run.info.run_id, "training_iteration")
        assert sorted(m.value for m in history) == sorted(iterations), trial
        expected_rows[run.info.run_id] = len(iterations)
        spans.append((min(r["timestamp"] - r["time_total_s"] for r in results), max(r["timestamp"] for r in results)))
    # trials ran 3 at a time (never more): the most trial spans that overlap at one start
    overlap = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert overlap == AT_ONCE, spans
    print(f"\n[concurrency] {len(children)} trial runs for {NUM_SAMPLES} trials, at most {overlap} at once; "
          f"{sum(expected_rows.values())} results in Tune's result.json files, as many training_iteration rows in MLflow")
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials_table.json", str(tmp_path))).read_text())
    column = table["columns"].index("trial_id")
    assert sorted(r[column] for r in table["data"]) == sorted(r.data.tags["trial_id"] for r in children)

    done = subprocess.run(["ray", "list", "placement-groups", "--address", smoke_study["dashboard"], "--format", "json",
                           "--limit", "1000"], env=smoke_study["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    groups = json.loads(done.stdout) if done.stdout.lstrip().startswith("[") else []
    assert groups and all(g["state"] == "REMOVED" for g in groups), [(g["placement_group_id"], g["state"]) for g in groups]

    if study_tracking is None:
        pytest.skip("PostgreSQL absent (outside CI): the study logged to its sqlite default")
    assert smoke_study["manifest"]["tracking_uri"] == study_tracking["uri"]
    # the rows in PostgreSQL itself, each once
    with study_tracking["postgres"]["connect"]() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT run_uuid) FROM runs WHERE experiment_id = %s",
                    (int(parent.info.experiment_id),))
        assert cur.fetchone() == (NUM_SAMPLES + 1, NUM_SAMPLES + 1)
        cur.execute("SELECT run_uuid, count(*) FROM metrics WHERE key = 'training_iteration' AND run_uuid = ANY(%s) "
                    "GROUP BY run_uuid", (list(expected_rows),))
        assert dict(cur.fetchall()) == expected_rows
        cur.execute("SELECT count(*) FROM experiments WHERE name = 'dualssl-smoke'")
        assert cur.fetchone() == (1,)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_study_refuses_resources_the_cluster_lacks(ray_head, phantom_root, tmp_path):
    address, _, env = ray_head
    args = _study_args(phantom_root, tmp_path, "--address", address)
    # Two trials of 2 workers x 1 CPU on a 2-CPU head would wait forever: refused with the fix.
    done = _tune(env, *args, "--max-concurrent-trials", "2", "--workers-per-trial", "2", timeout=100)
    assert done.returncode == 2 and "--max-concurrent-trials 1" in done.stderr
    assert not (tmp_path / "dualssl-smoke" / "trials.json").exists()
