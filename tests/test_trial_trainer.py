"""studies.trainable.TrialTorchTrainer: a real Ray Train run starts no Ray Data actor without datasets,
and stays Ray's own trainer with them."""

from __future__ import annotations

import sys

import pytest

ray = pytest.importorskip("ray")
import ray.train  # noqa: E402

from studies.trainable import TrialTorchTrainer  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _actor_classes() -> set[str]:
    # the GCS actor table (ray.util.state needs the dashboard, which these tests do not start)
    from ray._private.state import actors

    return {a["ActorClassName"] for a in actors().values()}


def _report_rank(config: dict) -> None:
    import ray.train

    metrics = {"rank": ray.train.get_context().get_world_rank()}
    if config.get("dataset"):
        metrics["rows"] = sum(1 for _ in ray.train.get_dataset_shard("train").iter_rows())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _fit(tmp_path, name: str, **kwargs) -> ray.train.Result:
    return TrialTorchTrainer(
        _report_rank, scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path)), **kwargs).fit()


def test_no_dataset_manager_without_datasets(local_ray, tmp_path):
    assert "DatasetManager" not in _actor_classes()
    result = _fit(tmp_path, "no-datasets", train_loop_config={})
    assert result.error is None and result.metrics["rank"] == 0
    classes = _actor_classes()
    assert "RayTrainWorker" in classes and "TrainController" in classes  # the run really went through Ray
    assert "DatasetManager" not in classes


def test_datasets_still_reach_the_workers(local_ray, tmp_path):
    import ray.data

    result = _fit(tmp_path, "with-datasets", train_loop_config={"dataset": True},
                  datasets={"train": ray.data.from_items([{"x": i} for i in range(5)])})
    assert result.error is None and result.metrics["rows"] == 5
    assert "DatasetManager" in _actor_classes()
