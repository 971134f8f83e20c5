"""cluster/: Ray's own validation of the launcher YAML and of the KubeRay clusters, a JSON-schema
check of every Kubernetes manifest, and the study commands they run parsed by the study's CLI."""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
sys.path.insert(0, str(REPO))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _schema(name: str) -> dict:
    return json.loads((CLUSTER / "schema" / name).read_text())


def _tune_args(command: str):
    """Parse a `python studies/tune.py ...` command with the study's own argument parser."""
    from studies.tune import build_parser

    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].endswith("studies/tune.py"), argv[:2]
    return build_parser().parse_args(argv[2:])


def test_launcher_yaml_passes_ray_validation_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-cluster.gpu.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    gpu_types = [t for t in prepared["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    start = " ".join(prepared["head_start_ray_commands"])
    assert "mlflow server" in start and "--backend-store-uri" in start
    assert any("/mnt/shared" in c for c in prepared["initialization_commands"])


def test_launcher_yaml_with_a_broken_field_is_rejected_by_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-cluster.gpu.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_pass_schema_and_ray_autoscaler_derivation(name):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (doc,) = _docs(CLUSTER / "kuberay" / name)
    jsonschema.validate(doc, _schema("kuberay.schema.json"))
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    cr = {"metadata": doc["metadata"], "spec": spec}
    derived = _derive_autoscaling_config_from_ray_cr(cr)  # runs Ray's validate_config itself
    gpu = derived["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] >= 1
    mounts = [m["mountPath"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
    assert mounts.count("/mnt/shared") == 1 + len(spec["workerGroupSpecs"])


def test_rayjob_runs_the_study_with_shared_storage_and_mlflow_server():
    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    args = _tune_args(job["spec"]["entrypoint"])
    assert args.storage_path.startswith("/mnt/shared/") and args.mlflow_tracking_uri.startswith("http://mlflow")
    assert args.gpus_per_worker >= 1
    from dualssl.config import Config

    cfg = Config.load(REPO / str(args.config).removeprefix("/app/")).validate()
    assert cfg.model.widths == (32, 64, 128, 256)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)


def test_kuberay_schema_rejects_a_worker_group_without_max_replicas():
    (doc,) = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema("kuberay.schema.json"))


def test_mlflow_and_storage_manifests_are_valid_kubernetes_objects():
    docs = _docs(CLUSTER / "mlflow" / "mlflow.yaml") + _docs(CLUSTER / "kuberay" / "shared-storage.yaml")
    schema = _schema("kubernetes.schema.json")
    for doc in docs:
        jsonschema.validate(doc, schema)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds
    server = next(d for d in docs if d["kind"] == "Deployment")
    command = " ".join(server["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri postgresql://" in command
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert env["working_dir"] == "."


def test_launcher_comment_command_parses():
    text = (CLUSTER / "ray-cluster.gpu.yaml").read_text()
    lines = [ln.lstrip("# ").rstrip("\\").strip() for ln in text.splitlines()[:8]]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("python studies/tune.py"))
    command = " ".join(ln for ln in lines[start:] if ln and not ln.startswith("("))
    args = _tune_args(command)
    assert args.storage_path == "/mnt/shared/studies" and args.gpus_per_worker == 1
