"""A real tracking server (PostgreSQL + `mlflow server` from cluster/mlflow/serve.sh): a parent run with
nested runs, metrics and artifacts logged over HTTP by several processes at once, then read back."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

N_RUNS, AT_ONCE, STEPS = 12, 3, 10
EXPERIMENT = "concurrent-writers"


def _log_trial(uri: str, experiment_id: str, parent_id: str, index: int) -> str:
    """One nested run (what a study's trial leaves): params, STEPS metric rows, one artifact."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"trial-{index:02d}", parent_run_id=parent_id) as run:
        mlflow.log_param("index", index)
        for step in range(STEPS):
            mlflow.log_metric("val_dice", index + step / 100, step=step)
        mlflow.log_text(f"trial {index}\n", "notes/trial.txt")
        return run.info.run_id


@pytest.mark.slow
def test_concurrent_nested_runs_over_http_are_all_stored_once(mlflow_server, tracking_postgres, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, run_name="study")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the server
    with ProcessPoolExecutor(max_workers=AT_ONCE, mp_context=ctx) as pool:
        futures = [pool.submit(_log_trial, mlflow_server, experiment_id, parent.info.run_id, i) for i in range(N_RUNS)]
        run_ids = [f.result(timeout=300) for f in futures]  # a "database is locked" would raise here
    client.set_terminated(parent.info.run_id)

    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=100)
    assert sorted(r.info.run_id for r in children) == sorted(run_ids) and len(set(run_ids)) == N_RUNS
    assert sorted(r.info.run_name for r in children) == [f"trial-{i:02d}" for i in range(N_RUNS)]
    for run in children:
        index = int(run.data.params["index"])
        history = client.get_metric_history(run.info.run_id, "val_dice")
        assert sorted((m.step, m.value) for m in history) == [(s, index + s / 100) for s in range(STEPS)]
        assert run.info.status == "FINISHED"
        local = client.download_artifacts(run.info.run_id, "notes/trial.txt", str(tmp_path / run.info.run_id))
        assert open(local).read() == f"trial {index}\n"
    assert [e.name for e in client.search_experiments() if e.name == EXPERIMENT] == [EXPERIMENT]

    # read the database itself, not through MLflow: the rows are in PostgreSQL, each once
    with tracking_postgres["connect"]() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT run_uuid) FROM runs WHERE experiment_id = %s",
                    (int(experiment_id),))
        assert cur.fetchone() == (N_RUNS + 1, N_RUNS + 1)
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = ANY(%s) AND key = 'val_dice'", (run_ids,))
        assert cur.fetchone() == (N_RUNS * STEPS,)
        cur.execute("SELECT count(*) FROM experiments WHERE name = %s", (EXPERIMENT,))
        assert cur.fetchone() == (1,)
