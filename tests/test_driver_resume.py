"""A killed driver loses nothing: ``python studies/tune.py`` (no ``--address``: it starts its own
private Ray head, studies/local_cluster.py) is SIGKILLed with its whole process group while its
second trial trains, then rerun with ``--resume``.

What must hold: no process of the private head outlives the driver; the finished trial is not
retrained (its Train run folder is byte-for-byte and mtime-for-mtime the same); the interrupted trial
resumes from its last epoch checkpoint; MLflow holds exactly one run per trial under the same parent
run; the Optuna journal holds the same study with exactly ``--num-samples`` trials, all finished.
The timeline (kill, resume start, resume end) is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import MARKER, checkpointed_epochs, marked_processes, wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXPERIMENT = "dualssl-smoke"
NUM_SAMPLES = 2
"""Trial 1 finishes before the kill, trial 2 is interrupted by it. A third would add a trial the
restored searcher suggests into the same journal (tests/test_search.py covers a restored searcher
writing there) at about 1.5 minutes on 2 busy cores."""
"""An environment variable of the driver only; the private head and every Ray process it spawns
inherit it, so /proc/PID/environ names exactly the processes of this test's study."""


def kill_marked(value: str) -> None:
    for pid in marked_processes(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def final_trials(study: Path) -> list[str]:
    """Trial ids whose Tune result.json holds the final result (training and cross-site done)."""
    out = []
    for result in study.glob("trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if any(r.get("final") == 1.0 for r in lines):
            out.append(result.parent.name.removeprefix("trial_"))
    return out


def saved_statuses(study: Path) -> dict[str, str]:
    """``{trial_id: status}`` from the driver's last saved experiment state (what ``--resume`` restores)."""
    out: dict[str, str] = {}
    for path in study.glob("experiment_state-*.json"):
        try:
            for trial_json, _ in json.loads(path.read_text())["trial_data"]:
                trial = json.loads(trial_json)
                out[trial["trial_id"]] = trial["status"]
        except (OSError, ValueError, KeyError):  # being rewritten
            pass
    return out


def journal_reports(journal: Path) -> dict[int, int]:
    """``{Optuna trial id: intermediate values recorded}`` in an Optuna journal file, once no driver
    holds its lock (a driver killed while writing leaves the lock, which Optuna breaks after 30 s)."""
    if Path(f"{journal}.lock").exists():
        return {}
    counts: dict[int, int] = {}
    try:
        lines = journal.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            op = json.loads(line)
        except ValueError:  # a line being written
            continue
        if op.get("op_code") == 4:  # a trial created
            counts.setdefault(len(counts), 0)
        elif op.get("op_code") == 7:  # an intermediate value
            counts[op["trial_id"]] = counts.get(op["trial_id"], 0) + 1
    return counts


def test_resumed_searcher_leaves_alone_a_trial_that_optuna_already_ended(tmp_path):
    """The driver dies after Optuna recorded a trial's end (here: PRUNED) but before Tune's next
    snapshot: ``--resume`` reruns the trial, and its results must not end the study
    (``UpdateFinishedTrialError``) nor change what Optuna recorded."""
    import optuna

    from studies.search_space import load_search_space, make_searcher, open_study, optuna_storage

    journal = tmp_path / "optuna.journal"
    storage = optuna_storage(journal)
    open_study(storage, "exp", ["max"], str(journal))
    first = make_searcher("objective", "max", seed=0, n_startup_trials=2, storage=storage, study_name="exp")
    first.set_search_properties(None, None, load_search_space())
    first.suggest("t1")
    first.on_trial_result("t1", {"objective": 0.2, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's snapshot: t1 still running
    first.on_trial_complete("t1", {"objective": 0.2, "training_iteration": 1})  # stopped early: PRUNED
    del first  # killed before the next snapshot

    restored = make_searcher("objective", "max", seed=0)
    restored.restore(str(tmp_path / "searcher.pkl"))  # tune.py --resume
    restored.on_trial_result("t1", {"objective": 0.3, "training_iteration": 2})  # t1 runs again
    restored.on_trial_complete("t1", {"objective": 0.3, "final": 1.0, "training_iteration": 2})
    restored.suggest("t2")
    restored.on_trial_result("t2", {"objective": 0.4, "training_iteration": 1})
    restored.on_trial_complete("t2", {"objective": 0.5, "final": 1.0, "training_iteration": 2})
    study = optuna.load_study(study_name="exp", storage=optuna_storage(journal))
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"]
    assert study.trials[0].intermediate_values == {1: 0.2} and study.trials[1].value == 0.5
    assert study.trials[1].intermediate_values == {1: 0.4}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_driver_resumes_without_losing_or_redoing_a_trial(phantom_root, tmp_path):
    import mlflow
    import optuna

    from studies.search_space import optuna_storage

    storage = tmp_path / "studies"
    study = storage / EXPERIMENT
    marker = secrets.token_hex(8)
    # No RAY_ADDRESS and no Ray token: tune.py must start (and authenticate to) its own head.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({MARKER: marker, "PYTHONUNBUFFERED": "1"})
    cmd = [sys.executable, str(REPO / "studies" / "tune.py"), "--smoke-test", "--data", str(phantom_root),
           "--storage-path", str(storage), "--set", f"data.cache_dir={storage / 'cache'}",
           "--num-samples", str(NUM_SAMPLES), "--max-concurrent-trials", "1", "--workers-per-trial", "1",
           # ASHA off (no rung before the last epoch): every trial trains to the end, so the one
           # interrupted is the one that resumes, whatever its Dice
           "--grace-period", "2", "--no-export",
           # one step an epoch (the smoke recipe's 4 teach nothing this test reads): the kill still lands
           # between trial 2's epoch-0 checkpoint and its end (its last epoch and cross-site evaluation)
           "--set", "optim.steps_per_epoch=1"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "resumed.log"
    timeline: dict[str, float] = {}
    try:
        t0 = time.time()
        with open(first_log, "w") as out:
            driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)

        # 1. Wait until trial 1 has finished (final result; the driver's saved state says TERMINATED)
        # and trial 2 trains: its Train run registered an epoch checkpoint and the driver has passed
        # that epoch's result on to Optuna (the journal is not being written: see journal_reports).
        def ready():
            done = final_trials(study)
            saved = saved_statuses(study)
            finished = [t for t in done if saved.get(t) == "TERMINATED"]
            running = [t for t, s in saved.items() if s == "RUNNING" and t not in done]
            reports = journal_reports(study / "optuna.journal")
            for trial in running:
                epochs = checkpointed_epochs(study / "train_runs" / f"train_{trial}")
                if finished and epochs and len(reports) == len(finished) + 1 and reports[max(reports)] >= 1:
                    return finished, trial, epochs
            return None

        finished, interrupted, epochs_before = wait_for("a finished trial and a checkpointed second one", ready,
                                                        driver, first_log, timeout=600, every=0.2)
        finished_runs = {t: tree(study / "train_runs" / f"train_{t}") for t in finished}
        interrupted_before = tree(study / "train_runs" / f"train_{interrupted}")
        parent_before = json.loads((study / "study.json").read_text())["parent_run_id"]
        assert marked_processes(marker), "found no process of the study by its environment marker"

        # 2. SIGKILL the driver's whole process group (what a killed `python studies/tune.py` or an
        # OOM-killed job driver gets: no handler, no cleanup).
        timeline["kill"] = time.time()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        # The private head runs in a session of its own, but it must not outlive its driver.
        deadline = time.monotonic() + 30
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = {pid: (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                           if Path(f"/proc/{pid}").exists() else "?") for pid in marked_processes(marker)}
        timeline["head_gone"] = time.time()
        assert not survivors, f"processes of the killed driver's private Ray head survive: {survivors}"

        journal = optuna_storage(study / "optuna.journal")
        before = optuna.load_study(study_name=EXPERIMENT, storage=journal).trials
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in before) == len(finished)

        # 3. The same command with --resume finishes the study.
        timeline["resume_start"] = time.time()
        with open(second_log, "w") as out:
            resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, timeout=600)
        timeline["resume_end"] = time.time()
        assert resumed.returncode == 0, second_log.read_text()[-6000:]
    finally:
        kill_marked(marker)  # whatever a failed step left running (our processes only)

    # 4. Nothing finished was redone, nothing interrupted was lost.
    rows = json.loads((study / "trials.json").read_text())
    assert len(rows) == NUM_SAMPLES and all(r["status"] == "completed" for r in rows), rows
    assert set(finished) | {interrupted} <= {r["trial_id"] for r in rows}
    for trial, files in finished_runs.items():
        assert tree(study / "train_runs" / f"train_{trial}") == files, f"finished trial {trial} was retrained"
    after = tree(study / "train_runs" / f"train_{interrupted}")
    for name in epochs_before:  # its checkpoints from before the kill were kept, not rewritten ...
        kept = {p: v for p, v in interrupted_before.items() if p.startswith(f"{name}/")}
        assert kept and all(after.get(p) == v for p, v in kept.items()), f"{name} of {interrupted} was rewritten"
    epochs_after = checkpointed_epochs(study / "train_runs" / f"train_{interrupted}")
    assert max(epochs_after) > max(epochs_before)  # ... and training went on from them

    # 5. MLflow: the same parent run, exactly one child run per trial; the interrupted trial's run
    # says it resumed from the epoch after its last checkpoint.
    manifest = json.loads((study / "study.json").read_text())
    assert manifest["parent_run_id"] == parent_before
    client = mlflow.MlflowClient(manifest["tracking_uri"])
    parent = client.get_run(parent_before)
    every = client.search_runs([parent.info.experiment_id], max_results=100)
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent_before]
    assert len(every) == NUM_SAMPLES + 1, [r.info.run_name for r in every]  # no second parent, no stray run
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(r["trial_id"] for r in rows)
    run = next(r for r in children if r.data.tags["trial_id"] == interrupted)
    resumed_from = {m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_epoch")}
    last_epoch = int(max(epochs_before).removeprefix("epoch_"))
    assert last_epoch + 1 in resumed_from, resumed_from
    for other in children:
        if other.data.tags["trial_id"] in finished:
            history = client.get_metric_history(other.info.run_id, "resumed_from_epoch")
            assert {m.value for m in history} == {0.0}  # trained once, start to end

    # 6. Optuna: the same study continued: NUM_SAMPLES trials, each finished once.
    ot = optuna.load_study(study_name=EXPERIMENT, storage=optuna_storage(study / "optuna.journal"))
    assert [s.study_name for s in optuna.get_all_study_summaries(optuna_storage(study / "optuna.journal"))] == [EXPERIMENT]
    assert len(ot.trials) == NUM_SAMPLES and all(t.state.is_finished() for t in ot.trials), \
        [(t.number, t.state) for t in ot.trials]
    for old in before:  # trials finished before the kill keep their values
        if old.state == optuna.trial.TrialState.COMPLETE:
            assert ot.trials[old.number].values == old.values

    print(f"\n[driver kill] first run start -> kill {timeline['kill'] - t0:.1f} s (trial(s) {finished} "
          f"finished, {interrupted} at {max(epochs_before)}); head gone {timeline['head_gone'] - timeline['kill']:.1f} s "
          f"after the kill; kill -> resume start {timeline['resume_start'] - timeline['kill']:.1f} s; resume run "
          f"{timeline['resume_end'] - timeline['resume_start']:.1f} s; resumed from epoch {last_epoch + 1}")
