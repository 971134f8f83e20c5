"""A real tracking server (PostgreSQL + `mlflow server` from cluster/mlflow/serve.sh) that stops while a
trial reports: the driver's writes wait and are logged once it answers. (The shared smoke study in
tests/test_study.py logs 12 trials, 3 at a time, to the session's server and checks every row.)"""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_results_wait_while_the_server_is_down_and_are_logged_when_it_answers(tracking_postgres, phantom_root, tmp_path,
                                                                            monkeypatch, capsys):
    """The driver's trial logger with a real server stopped mid-trial: no write raises, the results wait
    in the journal, and a second driver (a --resume after the first was killed) logs them in order."""
    import json

    import mlflow
    from conftest import MlflowServer
    from ray.tune.experiment import Trial

    from dualssl.recipes import recipe_config
    from studies.pending_writes import JOURNAL_NAME
    from studies.tracking import TrialRuns, start_parent_run
    from studies.trainable import TrialSettings, study_config

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; what client_defaults() shortens
    (tmp_path / "server").mkdir()
    server = MlflowServer(tracking_postgres, tmp_path / "server")
    uri = server.start()
    try:
        parent = start_parent_run(uri, "outage", "study-outage", {"role": "study"}, {})
        journal = tmp_path / JOURNAL_NAME
        cfg = recipe_config("smoke")
        cfg.data.root = str(phantom_root)
        trial = Trial("__fake", config=study_config(cfg, TrialSettings(), {}), trial_id="t0", stub=True)

        def result(epoch: int) -> dict:
            return {"timesteps_total": epoch, "val_dice": epoch / 10, "time": {"train_s": float(epoch)}}

        first = TrialRuns(uri, parent, {"seed": "0"}, journal=journal, retry_s=3600)
        first.setup()
        first.log_trial_start(trial)
        for epoch in (1, 2):
            first.log_trial_result(epoch, trial, result(epoch))
        assert not journal.exists()
        server.stop()
        for epoch in (3, 4, 5):  # the first fails and opens the outage; the next two only queue
            first.log_trial_result(epoch, trial, result(epoch))
        waiting = [json.loads(line) for line in journal.read_text().splitlines()]
        assert [(w["kind"], w["step"]) for w in waiting] == [("metrics", 3), ("metrics", 4), ("metrics", 5)]
        assert "does not answer" in capsys.readouterr().out
        # the first driver is killed here; the next one finds the journal and logs it first
        server.start()
        second = TrialRuns(uri, parent, {"seed": "0"}, journal=journal, retry_s=3600)
        second.setup()
        assert not journal.exists() and len(second.pending) == 0
        second.log_trial_start(trial)  # the resumed trial: its run is found, not created again
        second.log_trial_result(6, trial, result(6))
        second.log_trial_end(trial)
        second.on_experiment_end([])

        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == "t0"
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_dice")) == [
            (e, e / 10) for e in range(1, 7)]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "time/train_s")] == list(range(1, 7))
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == [phantom_root.name]
    finally:
        server.stop()
