"""A resume that keeps ASHA: a study whose driver is SIGKILLed after a rung decision and restored with
``Tuner.restore`` makes the same stop decisions as one that never died.

``Tuner.restore`` rebuilds the scheduler from the Tuner's file as it was created, without its rung
records (Ray issue 30838). ``studies.tune.make_scheduler``'s ASHA writes its state to the study folder
at every decision and reads it back after a restore. The trials here are a cheap deterministic trainable
(score ``q * epoch / EPOCHS``, one epoch checkpoint each) run one at a time in a fixed grid order through
the real ``tune.Tuner`` / ``Tuner.restore`` and the real scheduler of the study (``make_scheduler``), so
"the same results" holds by construction and any difference in the stops is the scheduler's.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import MARKER, marked_processes

REPO = Path(__file__).resolve().parents[1]
QS = [1.0, 0.9, 0.5, 0.2, 0.95, 0.3]
"""Uninterrupted, with grace period 2 and reduction factor 2 over 6 epochs (rungs at epochs 2 and 4):
q=1.0 runs to 6; 0.9, 0.5, 0.2 stop at 2 (below the rung's median); 0.95 passes rung 2 and stops at
4 (below q=1.0 there); 0.3 stops at 2. A scheduler that forgot the rungs lets 0.95 through rung 4."""

DRIVER = r'''
import json, math, os, sys, tempfile, time
from argparse import Namespace
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import ray
from ray import tune
from dualssl.config import Config
from studies.train_loop import ASHA_KEY
from studies.tune import ASHA_STATE, make_scheduler

repo, storage, mode, qs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
EPOCHS = 6

def trainable(config):
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["epoch"]
    for epoch in range(start + 1, EPOCHS + 1):
        time.sleep(config["sleep"])
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epochs_done": epoch, ASHA_KEY: config["q"] * epoch / EPOCHS, "q": config["q"]},
                        checkpoint=tune.Checkpoint.from_directory(d))

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # its own cluster
path = str(storage / "exp")
trainable_r = tune.with_resources(trainable, {"cpu": 1})
if mode == "resume":
    tuner = tune.Tuner.restore(path, trainable_r, resume_unfinished=True, resume_errored=True)
else:
    cfg = Config()
    cfg.optim.epochs, cfg.eval.val_every = EPOCHS, 1
    args = Namespace(grace_period=2, selection="source-val", objectives="val_dice")
    scheduler = make_scheduler(cfg, args, storage / ASHA_STATE)
    tuner = tune.Tuner(trainable_r, param_space={"q": tune.grid_search(qs), "sleep": 1.0},
                       tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="exp", storage_path=str(storage), verbose=0))
grid = tuner.fit()
epochs = {str(r.config["q"]): int((r.metrics or {}).get("epochs_done", -1)) for r in grid}
(storage / "epochs.json").write_text(json.dumps(epochs))
ray.shutdown()
'''


def _env(marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # a private local cluster with its own token (Ray reads these when it is first imported)
    return {**env, MARKER: marker, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def _driver(script: Path, storage: Path, mode: str, log: Path, marker: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(REPO), str(storage), mode, json.dumps(QS)],
                            env=_env(marker), stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill(driver: subprocess.Popen, marker: str) -> None:
    """SIGKILL the driver's process group and every process it spawned (its local Ray cluster)."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait(timeout=60)
    for _ in range(3):
        for pid in marked_processes(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _finish(driver: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    try:
        code = driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the driver did not finish in {timeout} s: {log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]


def _rung_records(state_path: Path, milestone: float) -> int:
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(rec) for bracket in state["brackets"] for m, rec in bracket if m == milestone)


def _decisions(state: dict) -> dict:
    """ASHA's decisions by grid index (Tune's trial ids end in it, and the grid order is fixed):
    ``{"stopped": [indices], "rungs": {milestone: {index: signed reward}}}``."""
    index = lambda trial_id: int(trial_id.rsplit("_", 1)[1])  # noqa: E731
    return {"stopped": sorted(index(t) for t in state["stopped"]),
            "rungs": {m: {index(t): v for t, v in rec.items()} for bracket in state["brackets"] for m, rec in bracket}}


def _run(tmp_path: Path, name: str, kill_after: int | None, keep_state: bool = True) -> dict:
    """ASHA's decisions (:func:`_decisions`) over a study run uninterrupted, or killed once ``kill_after``
    trials are recorded at rung 2 and restored (with the scheduler's state file, or without it as Ray
    alone would: then the decisions are those taken before the kill plus those after)."""
    from studies.tune import ASHA_STATE

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    storage, log, marker = tmp_path / name, tmp_path / f"{name}.log", secrets.token_hex(8)
    storage.mkdir()
    state_path = storage / ASHA_STATE
    before = {"stopped": [], "rungs": {}}
    driver = _driver(script, storage, "fresh", log, marker)
    try:
        if kill_after is None:
            _finish(driver, log)
        else:
            deadline = time.time() + 900
            while _rung_records(state_path, 2.0) < kill_after:
                if driver.poll() is not None or time.time() > deadline:
                    pytest.fail(f"no rung decision to kill after: {log.read_text()[-3000:]}")
                time.sleep(0.1)
            _kill(driver, marker)
            assert not (storage / "epochs.json").exists()  # killed mid-study
            if not keep_state:
                before = _decisions(json.loads(state_path.read_text()))
                state_path.unlink()
            driver = _driver(script, storage, "resume", log, marker)
            _finish(driver, log)
    finally:
        if driver.poll() is None:
            _kill(driver, marker)
    after = _decisions(json.loads(state_path.read_text()))
    rungs = {m: {**before["rungs"].get(m, {}), **rec} for m, rec in after["rungs"].items()}
    return {"stopped": sorted(set(before["stopped"]) | set(after["stopped"])), "rungs": rungs}


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_a_killed_and_resumed_study_makes_the_same_asha_decisions(tmp_path):
    # What a study that never died decides, worked out by hand in QS's docstring: every trial recorded at
    # rung 2 with reward q * 2 / 6, q=1.0 and q=0.95 at rung 4 with q * 4 / 6 (the trainable's very
    # expression, so the floats match bit for bit), all but q=1.0 stopped. (An uninterrupted run of the
    # driver used to be compared here; it made exactly these decisions, and as a third Ray study it cost
    # about a minute. A resume that differs from it differs from these.)
    uninterrupted = {"stopped": [1, 2, 3, 4, 5],
                     "rungs": {2.0: {i: q * 2 / 6 for i, q in enumerate(QS)},
                               4.0: {i: QS[i] * 4 / 6 for i in (0, 4)}}}
    resumed = _run(tmp_path, "resumed", kill_after=3)
    assert resumed == uninterrupted
    # What Ray's restore alone does (the scheduler's file gone): rung 4 forgets q=1.0 (finished before
    # the kill), so q=0.95 is never cut there and trains to the end.
    forgetful = _run(tmp_path, "forgetful", kill_after=3, keep_state=False)
    assert 4 not in forgetful["stopped"] and forgetful["stopped"] != uninterrupted["stopped"]


def _scheduler(state_path: Path):
    from dualssl.config import Config
    from studies.tune import make_scheduler

    cfg = Config()
    cfg.optim.epochs, cfg.eval.val_every = 6, 1
    return make_scheduler(cfg, argparse.Namespace(grace_period=2, selection="source-val", objectives="val_dice"),
                          state_path)


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_scheduler_state_round_trips_and_a_stopped_trial_stays_stopped(tmp_path):
    """The state file itself (no Ray runtime): rungs, brackets and stops survive a fresh scheduler object,
    a NaN result records nothing, and a new study clears an old file."""
    from ray.tune.schedulers import TrialScheduler

    from studies.train_loop import ASHA_KEY

    path = tmp_path / "asha_state.json"
    first = _scheduler(path)
    a, b = _Trial("a"), _Trial("b")
    for t in (a, b):
        first.on_trial_add(None, t)
    assert first.on_trial_result(None, a, {"epochs_done": 2, ASHA_KEY: 0.5}) == TrialScheduler.CONTINUE
    assert first.on_trial_result(None, b, {"epochs_done": 1, ASHA_KEY: float("nan")}) == TrialScheduler.CONTINUE
    assert first.on_trial_result(None, b, {"epochs_done": 2, ASHA_KEY: 0.1}) == TrialScheduler.STOP
    saved = json.loads(path.read_text())
    assert saved["stopped"] == ["b"] and saved["num_stopped"] == 1
    assert {m: rec for m, rec in saved["brackets"][0]} == {4.0: {}, 2.0: {"a": 0.5, "b": 0.1}}

    restored = _scheduler(None)  # as unpickled from the Tuner's file: the path, not the rungs
    restored.state_path = str(path)
    c = _Trial("c")
    restored.on_trial_add(None, c)
    assert restored.on_trial_result(None, b, {"epochs_done": 3, ASHA_KEY: 0.9}) == TrialScheduler.STOP
    assert restored.on_trial_result(None, c, {"epochs_done": 2, ASHA_KEY: 0.2}) == TrialScheduler.STOP
    assert restored.on_trial_result(None, a, {"epochs_done": 3, ASHA_KEY: 0.6}) == TrialScheduler.CONTINUE
    assert json.loads(path.read_text())["brackets"][0][1][1] == {"a": 0.5, "b": 0.1, "c": 0.2}

    _scheduler(path)  # a new study (not a resume) starts from empty rungs
    assert not path.exists()
