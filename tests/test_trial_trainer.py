"""studies.trainable.TrialTorchTrainer on a real Ray runtime: a Train run without datasets starts no
Ray Data actor, and one with datasets still gets its shards (the trainer is then Ray's own).

The runs happen in a fresh interpreter: Ray's token authentication keeps process-wide state that
other tests' in-process Ray calls may already have set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, tempfile
import ray, ray.data, ray.train
from ray._private.state import actors  # the GCS actor table (ray.util.state needs the dashboard)
from studies.trainable import TrialTorchTrainer

def classes():
    return sorted({a["ActorClassName"] for a in actors().values()})

def loop(config):
    metrics = {"rank": ray.train.get_context().get_world_rank()}
    if config["dataset"]:
        metrics["rows"] = sum(1 for _ in ray.train.get_dataset_shard("train").iter_rows())
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

def fit(name, **kwargs):
    result = TrialTorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                               run_config=ray.train.RunConfig(name=name, storage_path=sys.argv[1]), **kwargs).fit()
    return {"metrics": result.metrics, "actors": classes()}  # fit() raises when the run fails

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
out = {"plain": fit("plain", train_loop_config={"dataset": False})}
out["with_datasets"] = fit("with-datasets", train_loop_config={"dataset": True},
                           datasets={"train": ray.data.from_items([{"x": i} for i in range(5)])})
print("PROBE " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["HOME"] = str(tmp_path_factory.mktemp("home"))  # Ray writes its auth token under HOME
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path_factory.mktemp("runs"))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_no_dataset_manager_without_datasets(probe):
    run = probe["plain"]
    assert run["metrics"]["rank"] == 0
    assert {"RayTrainWorker", "TrainController"} <= set(run["actors"])  # the run really went through Ray
    assert "DatasetManager" not in run["actors"], run["actors"]


def test_datasets_still_reach_the_workers(probe):
    run = probe["with_datasets"]
    assert run["metrics"]["rows"] == 5
    assert "DatasetManager" in run["actors"]
