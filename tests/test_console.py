"""What a study prints: the progress table's schedule, Tune's loggers and the quiet defaults."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import studies.tune as tune_mod  # noqa: E402
from studies.preflight import console_defaults  # noqa: E402


@dataclass
class FakeTrial:
    trial_id: str
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)


def test_the_table_is_printed_when_trials_end_not_when_they_start(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tune_mod.time, "time", lambda: clock[0])
    reporter = tune_mod.progress_reporter({"loss.tau": None})
    a, b = FakeTrial("a"), FakeTrial("b")
    assert not reporter.should_report([a, b])  # nothing runs yet
    a.status = "RUNNING"
    assert reporter.should_report([a, b])  # the first table
    a.last_result = {"epochs_done": 1}
    clock[0] += 10
    assert not reporter.should_report([a, b])  # a new epoch, but within REPORT_EVERY_S
    a.status, b.status = "TERMINATED", "RUNNING"
    assert reporter.should_report([a, b])  # a ended
    b.last_result = {"epochs_done": 1}
    clock[0] += 10
    assert not reporter.should_report([a, b])  # b started and trained an epoch: no table
    clock[0] += tune_mod.REPORT_EVERY_S + 1
    b.last_result = {"epochs_done": 2}
    assert reporter.should_report([a, b])  # periodic, for new epochs
    assert not reporter.should_report([a, b])
    assert reporter.should_report([a, b], done=True)


def test_tune_gets_json_and_csv_loggers_and_no_tensorboard(monkeypatch):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from studies.tracking import result_loggers

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    loggers = result_loggers()
    assert sorted(type(c).__name__ for c in loggers) == sorted([CSVLoggerCallback.__name__, JsonLoggerCallback.__name__])
    import os

    assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"  # so Tune adds no TBXLoggerCallback


def test_console_defaults_quiet_tune_and_mlflow_unless_verbose_or_set(monkeypatch):
    import os

    for name in ("TUNE_WARN_THRESHOLD_S", "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(name, raising=False)
    console_defaults(verbose=True)
    assert "TUNE_WARN_THRESHOLD_S" not in os.environ
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")  # the user's choice is kept
    console_defaults(verbose=False)
    assert float(os.environ["TUNE_WARN_THRESHOLD_S"]) >= 10
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_the_export_prints_no_type_hint_advice_after_console_defaults():
    import subprocess

    code = ("import sys; sys.path.insert(0, {root!r})\n"
            "from studies.preflight import console_defaults\n"
            "{call}\n"
            "import dualssl.serving\n")
    root = str(Path(__file__).resolve().parents[1])
    runs = {call: subprocess.run([sys.executable, "-W", "always", "-c", code.format(root=root, call=call)],
                                 capture_output=True, text=True, timeout=120)
            for call in ("console_defaults(False)", "console_defaults(True)")}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-500:] for r in runs.values()]
    assert "Add type hints" not in runs["console_defaults(False)"].stderr
    assert "Add type hints" in runs["console_defaults(True)"].stderr  # --verbose shows it, as MLflow does
