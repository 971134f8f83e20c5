"""cluster/: Ray's own validation of the launcher YAML and of the KubeRay clusters, a JSON-schema
check of every Kubernetes manifest, and the study commands they run parsed by the study's CLI."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
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
    assert "cluster/mlflow/serve.sh" in start and "MLFLOW_BACKEND_STORE_URI=sqlite:" in start
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
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # the Ray container of every group
        ray_container = group["template"]["spec"]["containers"][0]
        assert "/mnt/shared" in [m["mountPath"] for m in ray_container["volumeMounts"]]


def test_rayjob_runs_the_study_with_shared_storage_and_mlflow_server():
    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    args = _tune_args(job["spec"]["entrypoint"].split("&&")[-1].strip())  # the study, after the data pass
    assert args.storage_path.startswith("/mnt/shared/") and args.mlflow_tracking_uri == "http://127.0.0.1:5000"
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
    docs = [*_docs(CLUSTER / "mlflow" / "mlflow.yaml"), *_docs(CLUSTER / "kuberay" / "shared-storage.yaml"),
            *_docs(CLUSTER / "kuberay" / "network-policy.yaml")]
    schema = _schema("kubernetes.schema.json")
    for doc in docs:
        jsonschema.validate(doc, schema)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    bad = copy.deepcopy(next(d for d in docs if d["kind"] == "NetworkPolicy"))
    bad["spec"]["ingress"][0]["ports"] = [{"protocol": "TCP"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


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


# --- secure defaults: loopback listeners, no world-writable storage, passwords only from secrets ------

KUBERAY = ["raycluster.yaml", "rayjob.yaml"]


def _ray_cluster_spec(name: str) -> dict:
    (doc,) = _docs(CLUSTER / "kuberay" / name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pod_specs(name: str) -> list[tuple[str, dict]]:
    spec = _ray_cluster_spec(name)
    return [("head", spec["headGroupSpec"]["template"]["spec"]),
            *[(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]]


def _all_manifests() -> list[tuple[str, dict]]:
    return [(str(path.relative_to(CLUSTER)), doc) for path in sorted(CLUSTER.rglob("*.yaml")) for doc in _docs(path)]


def _walk(node, path=""):
    """(dotted path, value) of every scalar of a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def _serve_script_command() -> str:
    lines = (CLUSTER / "mlflow" / "serve.sh").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("exec mlflow server"))
    return " ".join(ln.rstrip("\\\\").strip() for ln in lines[start:start + 4])


def test_the_mlflow_recipe_listens_on_loopback_only():
    command = _serve_script_command()
    assert "--host 127.0.0.1" in command and command.count("--host") == 1
    assert "--backend-store-uri" in command and "--serve-artifacts" in command


def test_launcher_dashboard_and_mlflow_listen_on_the_head_loopback():
    raw = yaml.safe_load((CLUSTER / "ray-cluster.gpu.yaml").read_text())
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert "cluster/mlflow/serve.sh" in start and "mlflow server" not in start  # the one recipe, on 127.0.0.1
    text = (CLUSTER / "ray-cluster.gpu.yaml").read_text()
    assert "0.0.0.0" not in text and "http://HEAD_IP" not in text


def test_kuberay_heads_run_mlflow_beside_them_on_loopback():
    for name in KUBERAY:
        head = _pod_specs(name)[0][1]
        (mlflow,) = [c for c in head["containers"] if c["name"] == "mlflow"]
        assert mlflow["command"][-1].endswith("cluster/mlflow/serve.sh")
        assert "httpGet" not in mlflow["readinessProbe"]  # a kubelet probe could not reach 127.0.0.1
        assert "127.0.0.1:5000" in " ".join(mlflow["readinessProbe"]["exec"]["command"])
    assert _ray_cluster_spec("raycluster.yaml")["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_the_one_dashboard_off_loopback_is_fenced_by_a_network_policy():
    """RayJob's operator polls the job through the head Service: only it and the namespace get in."""
    off_loopback = [(name, path) for name, doc in _all_manifests() for path, value in _walk(doc)
                    if value == "0.0.0.0" or (isinstance(value, str) and "0.0.0.0" in value)]
    assert off_loopback == [("kuberay/rayjob.yaml", "spec.rayClusterSpec.headGroupSpec.rayStartParams.dashboard-host")]
    (policy,) = _docs(CLUSTER / "kuberay" / "network-policy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ray_pods, _submitter, operator = policy["spec"]["ingress"]
    assert "namespaceSelector" not in ray_pods["from"][0]  # this namespace only
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    (db_policy,) = [d for d in _docs(CLUSTER / "mlflow" / "mlflow.yaml") if d["kind"] == "NetworkPolicy"]
    assert db_policy["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"ray.io/node-type": "head"}}}]


def test_shared_storage_is_group_writable_not_world_writable():
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".sh", ""} | {".md"}:
            text = path.read_text()
            for bad in ("chmod 777", "chmod -R 777", "chmod a+w", "chmod o+w", "chmod 0777"):
                assert bad not in text, f"{path}: {bad}"
    raw = yaml.safe_load((CLUSTER / "ray-cluster.gpu.yaml").read_text())
    init = " ".join(raw["initialization_commands"])
    assert "chown 1000:100 /mnt/shared" in init and "chmod 2775 /mnt/shared" in init  # setgid, group rwx
    for name in KUBERAY:
        for group, pod in _pod_specs(name):
            if any(m["mountPath"] == "/mnt/shared" for c in pod["containers"] for m in c.get("volumeMounts", [])):
                assert pod.get("securityContext", {}).get("fsGroup") == 100, f"{name}: {group} lacks fsGroup 100"


_URI_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")


def test_database_passwords_come_only_from_secrets():
    for name, doc in _all_manifests():
        for path, value in _walk(doc):
            assert not (isinstance(value, str) and _URI_WITH_PASSWORD.search(value)), f"{name}: {path}"
        for path, value in _walk(doc):
            if path.endswith(".name") and re.search(r"PASSWORD|SECRET|TOKEN", str(value)):
                env = _lookup(doc, path.rsplit(".", 1)[0])
                if str(value).endswith("_FILE"):  # a file: it must lie on a Secret volume
                    assert env["value"].startswith("/etc/mlflow-db/"), f"{name}: {path}"
                else:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {path}"
    containers = [c for name in KUBERAY for _, pod in _pod_specs(name) for c in pod["containers"]]
    containers += [c for d in _docs(CLUSTER / "mlflow" / "mlflow.yaml") if d["kind"] == "StatefulSet"
                   for c in d["spec"]["template"]["spec"]["containers"]]
    for c in containers:
        argv = " ".join(c.get("command", []) + c.get("args", []))
        assert "PASSWORD" not in argv and "$(" not in argv, c["name"]
        for mount in c.get("volumeMounts", []):
            if mount["mountPath"] == "/etc/mlflow-db":
                assert mount["readOnly"] is True
    text = (CLUSTER / "README.md").read_text()
    assert "--from-literal=password=" not in text.replace('--from-literal=password="$(openssl rand', "")


def _lookup(doc, dotted: str):
    node = doc
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def _serve(env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
    return subprocess.run(["bash", str(CLUSTER / "mlflow" / "serve.sh")], env={**base, **env},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_serve_script_refuses_a_password_in_the_store_uri_or_a_missing_password_file(tmp_path):
    art = str(tmp_path / "artifacts")
    out = _serve({"MLFLOW_ARTIFACTS": art, "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:hunter2@db:5432/mlflow"},
                 tmp_path)
    assert out.returncode == 2 and "MLFLOW_DB_PASSWORD_FILE" in out.stderr and "hunter2" not in out.stderr
    out = _serve({"MLFLOW_ARTIFACTS": art, "MLFLOW_DB_HOST": "db", "MLFLOW_DB_PASSWORD_FILE": str(tmp_path / "no")},
                 tmp_path)
    assert out.returncode == 2 and "is not a readable file" in out.stderr
    out = _serve({"MLFLOW_DB_HOST": "db"}, tmp_path)
    assert out.returncode == 2 and "MLFLOW_ARTIFACTS" in out.stderr


# --- safe to apply: token auth from a Secret, pinned images, the head fenced, the data pass as a step -----

_PINNED = re.compile(r"^[\w.\-/]+(:[\w][\w.\-]{0,127})?(@sha256:[0-9a-f]{64})?$")


def _images(name: str) -> list[str]:
    (doc,) = _docs(CLUSTER / "kuberay" / name)
    pods = [pod for _, pod in _pod_specs(name)]
    if doc["kind"] == "RayJob":
        pods.append(doc["spec"]["submitterPodTemplate"]["spec"])
    return [c["image"] for pod in pods for c in pod["containers"]]


def _is_pinned(image: str) -> bool:
    """An exact tag (not latest) or a digest."""
    if not _PINNED.match(image):
        return False
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_clusters_use_ray_token_auth_from_a_secret(name):
    spec = _ray_cluster_spec(name)
    assert spec["authOptions"] == {"mode": "token", "secretName": "dualssl-ray-token"}
    (doc,) = _docs(CLUSTER / "kuberay" / name)
    jsonschema.validate(doc, _schema("kuberay.schema.json"))
    bad = copy.deepcopy(doc)
    (bad["spec"] if doc["kind"] == "RayCluster" else bad["spec"]["rayClusterSpec"])["authOptions"] = {"mode": "tokens"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema("kuberay.schema.json"))
    # no token in a manifest: only the Secret holds it, and the README creates it from random bytes
    for path, value in _walk(doc):
        assert "RAY_AUTH_TOKEN" not in str(path) + str(value), path
    readme = (CLUSTER / "README.md").read_text()
    assert 'create secret generic dualssl-ray-token --from-literal=auth_token="$(openssl rand' in readme


def test_every_image_is_pinned_to_an_exact_tag_or_digest():
    images = [*_images("raycluster.yaml"), *_images("rayjob.yaml")]
    assert images and all(_is_pinned(i) for i in images), images
    assert len(set(images)) == 1  # the image built from cluster/Dockerfile, everywhere
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = next(ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("FROM "))
    assert _is_pinned(base) and images[0] in dockerfile
    assert not _is_pinned("ghcr.io/example/dualssl:latest") and not _is_pinned("ghcr.io/example/dualssl")
    assert _is_pinned("ghcr.io/example/dualssl@sha256:" + "0" * 64)


def test_network_policy_opens_the_head_only_to_the_cluster_pods_the_submitter_and_the_operator():
    (policy,) = _docs(CLUSTER / "kuberay" / "network-policy.yaml")
    jsonschema.validate(policy, _schema("kubernetes.schema.json"))
    own, submitter, operator = policy["spec"]["ingress"]
    (own_from,) = own["from"]
    assert set(own_from) == {"podSelector"}  # no namespaceSelector: this namespace's Ray pods only
    assert own_from["podSelector"]["matchExpressions"] == [
        {"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}]
    assert submitter["ports"] == operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    labels = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert submitter["from"] == [{"podSelector": {"matchLabels": labels}}]
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # the head's GCS, client and dashboard ports are those the policy fences (its selector: the head)
    head = _pod_specs("raycluster.yaml")[0][1]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} <= {6379, 10001, 8265}


def test_rayjob_runs_the_data_pass_as_a_step_before_the_study_with_the_same_flags():
    from studies.preflight import build_parser

    (job,) = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    steps = [s.strip() for s in job["spec"]["entrypoint"].split("&&")]
    assert len(steps) == 2
    first, second = (shlex.split(s) for s in steps)
    assert first[:2] == ["python", "/app/studies/preprocess.py"] and second[:2] == ["python", "/app/studies/tune.py"]
    assert first[2:] == second[2:]
    args = build_parser().parse_args(first[2:])
    assert args.data is not None and str(args.data).startswith("/mnt/shared/")
