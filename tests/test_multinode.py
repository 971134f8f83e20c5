"""A real two-node Ray cluster on this machine, one smoke study submitted to it with ``ray job submit``,
and a node lost while a trial trains on it.

The cluster: a head (2 CPUs) and a worker node (1 CPU), each a ``ray start --block`` of its own (own
raylet, temp dir, ports, process group) on 127.0.0.1, token authentication as in the README (a fresh
HOME, ``RAY_AUTH_MODE=token``, ``ray get-auth-token --generate``), one shared storage folder. Another
job holds one head CPU when the study starts, so the trial's 2 DDP workers (1 CPU each) cannot pack
onto one node: one lands on the head, one on the worker node (checked with the state API,
``ray list actors``). That job then ends, and once the trial's first epoch checkpoint is registered
the worker node's whole process group is SIGKILLed (a machine gone). The trial must restart its worker
group from that checkpoint on the head alone, finish, keep exactly one MLflow run, and the job must
succeed; the recovery time (kill -> next epoch registered) is printed (``pytest -s``).

Every process started here is in one of the two process groups this module created, and only those
are killed (never ``ray stop``, which would stop other Ray clusters on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_helpers import checkpointed_epochs, marked_processes, wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from studies.local_cluster import stop_group  # noqa: E402

UNSEEN = ["cone_beam", "native_thick"]  # conftest TEST_SITES minus the source site
WORKER_NODE_MEMORY = 128 * 1024**2
"""The worker node's ``memory`` resource: below a Tune trial's 256 MiB reservation
(studies/resources.py), so trials (and with them each Train run's controller) stay on the head and
only Train workers can use the worker node: losing it then loses workers, not the trial's driver."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports a second raylet on the same address would otherwise share with the first."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            "--node-manager-port=0", "--object-manager-port=0", "--min-worker-port=0", "--max-worker-port=0"]


def _describe(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return f"state {stat[0]} ppid {stat[1]} pgid {stat[2]}: {cmd[:200]}"
    except OSError:
        return "gone"


class Cluster:
    """The CLI view of the cluster: ``ray job`` and ``ray list`` with the cluster's token."""

    def __init__(self, dashboard: str, env: dict[str, str]):
        self.dashboard, self.env = dashboard, env
        self.head_id = self.worker_id = self.marker = ""

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def state(self, kind: str, *filters: str) -> list[dict]:
        args = ["list", kind, "--address", self.dashboard, "--format", "json", "--limit", "1000"]
        for f in filters:
            args += ["--filter", f]
        done = self.ray(*args)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(done.stdout) if done.stdout.lstrip().startswith("[") else []  # "No resource in the cluster"

    def workers(self, *filters: str) -> list[dict]:
        """Ray Train's worker actors (``RayTrainWorker``), with their node id and state."""
        return self.state("actors", "class_name=RayTrainWorker", *filters)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (2 CPUs, resource ``head_slot``) + worker node (1 CPU): yields (Cluster, head, worker node)."""
    home = tmp_path_factory.mktemp("home")  # README: the token lives in ~/.ray/auth_token
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    marker = secrets.token_hex(8)  # the head's processes: marker-head, the worker node's: marker-worker
    # (no drain on SIGTERM: Ray would wait up to 30 s per node at teardown)
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               DUALSSL_TEST_PROCESS_MARKER=f"{marker}-head")
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert token.returncode == 0 and (home / ".ray" / "auth_token").is_file(), token.stderr[-2000:]
    port, dash = _free_port(), _free_port()
    # Short temp dirs (Ray's socket paths must stay under 108 bytes), one per node.
    temps = [Path(tempfile.mkdtemp(prefix="dualssl-ray-", dir="/tmp")) for _ in range(2)]
    logs = tmp_path_factory.mktemp("ray-logs")
    started: list[subprocess.Popen] = []
    try:
        with open(logs / "head.log", "w") as log:
            head = subprocess.Popen(
                ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                 f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                 f"--ray-client-server-port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
                 '--resources={"head_slot": 1}', f"--temp-dir={temps[0]}", "--disable-usage-stats", *_node_ports()],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(head)
        cluster = Cluster(f"http://127.0.0.1:{dash}", env)
        deadline = time.time() + 240
        # Ready once the head accepts a job (README: `ray job list` answers before the job agent is up).
        while cluster.ray("job", "submit", "--address", cluster.dashboard, "--", "true", timeout=60).returncode:
            assert time.time() < deadline and head.poll() is None, (logs / "head.log").read_text()[-3000:]
            time.sleep(3)
        with open(logs / "worker.log", "w") as log:
            worker = subprocess.Popen(
                ["ray", "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=1", "--num-gpus=0", f"--memory={WORKER_NODE_MEMORY}",
                 f"--object-store-memory={100 * 1024**2}", f"--temp-dir={temps[1]}", "--disable-usage-stats",
                 *_node_ports()],
                env={**env, "DUALSSL_TEST_PROCESS_MARKER": f"{marker}-worker"}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(worker)
        while len([n for n in cluster.state("nodes") if n["state"] == "ALIVE"]) < 2:
            assert time.time() < deadline and worker.poll() is None, (logs / "worker.log").read_text()[-3000:]
            time.sleep(2)
        nodes = cluster.state("nodes", "state=ALIVE")
        cluster.head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        cluster.worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
        cluster.marker = marker
        yield cluster, head, worker
    finally:
        for proc in reversed(started):
            stop_group(proc, wait_s=15)
        for pid in marked_processes(f"{marker}-head") + marked_processes(f"{marker}-worker"):  # left its group (none expected)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def lost_node_study(two_nodes, phantom_root, tmp_path_factory):
    """The smoke study (1 trial, 2 workers) as a Ray job on the two nodes; the worker node is killed
    after the trial's first epoch checkpoint. Returns what the checks below need."""
    cluster, _, worker_node = two_nodes
    storage = tmp_path_factory.mktemp("shared") / "studies"  # the storage every node sees
    record: dict = {"storage": storage, "study": storage / "dualssl-smoke"}
    # Another job holds one of the head's 2 CPUs: the trial's 2 workers must use both nodes.
    hold = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", "holds-a-head-cpu",
                       "--no-wait", "--entrypoint-num-cpus=1", '--entrypoint-resources={"head_slot": 1}',
                       "--", "sleep", "900")
    assert hold.returncode == 0, hold.stdout[-2000:] + hold.stderr[-2000:]
    deadline = time.time() + 120
    while "RUNNING" not in cluster.ray("job", "status", "--address", cluster.dashboard, "holds-a-head-cpu").stdout:
        assert time.time() < deadline, "the CPU-holding job did not start"
        time.sleep(2)

    cmd = ["ray", "job", "submit", "--address", cluster.dashboard, "--submission-id", "smoke-study",
           "--working-dir", str(REPO), "--", "python", "studies/tune.py", "--smoke-test", "--data", str(phantom_root),
           "--storage-path", str(storage), "--set", f"data.cache_dir={storage / 'cache'}",
           # epochs long enough that the kill lands inside epoch 1, not after it (a smoke epoch is ~2 s)
           "--set", "optim.steps_per_epoch=16", "--num-samples", "1",
           "--workers-per-trial", "2", "--max-concurrent-trials", "1"]
    record["submitted"] = time.time()
    job_log = storage.parent / "job.log"  # the driver's output, streamed by `ray job submit`
    with open(job_log, "w") as log:
        job = subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. Where the trial's workers run (state API), then the other job ends: the head has 2 CPUs.
        record["first_group"] = wait_for("two running Train workers",
                                      lambda: (lambda w: w if len(w) == 2 else None)(cluster.workers("state=ALIVE")),
                                      job, job_log, timeout=420, every=1.0)
        # (in the background: the first epoch checkpoint may come before the CLI returns)
        release = subprocess.Popen(["ray", "job", "stop", "--address", cluster.dashboard, "holds-a-head-cpu"],
                                   env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # 2. The first epoch checkpoint is registered: lose the worker node (its whole process group).
        runs = storage / "dualssl-smoke" / "train_runs"
        run = wait_for("an epoch checkpoint", lambda: next((r for r in runs.glob("train_*") if checkpointed_epochs(r)), None),
                    job, job_log, timeout=300, every=0.2)
        record["before_kill"] = checkpointed_epochs(run)
        assert record["before_kill"] == ["epoch_0000"], f"trained past epoch 0 before the kill: {record['before_kill']}"
        record["kill"] = time.time()
        os.killpg(worker_node.pid, signal.SIGKILL)
        worker_node.wait(timeout=30)

        # 3. The next epoch registered after the kill: the worker group was restarted and trained on.
        last = max(record["before_kill"])
        wait_for("an epoch after the kill", lambda: any(c > last for c in checkpointed_epochs(run)), job, job_log, timeout=420,
                 every=0.2)
        record["next_epoch"] = time.time()
        record["after_kill"] = checkpointed_epochs(run)
        # A lost machine keeps nothing running: no process of the worker node is left by now.
        deadline = time.monotonic() + 15
        while marked_processes(f"{cluster.marker}-worker") and time.monotonic() < deadline:
            time.sleep(0.5)
        record["node_survivors"] = {pid: _describe(pid) for pid in marked_processes(f"{cluster.marker}-worker")}
        released = release.communicate(timeout=120)[0]
        assert release.returncode == 0, released[-2000:]
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        cluster.ray("job", "stop", "--address", cluster.dashboard, "holds-a-head-cpu")
    record["done"] = time.time()
    record.update(returncode=job.returncode, stdout=job_log.read_text(), stderr="", train_run=run,
                  workers=cluster.workers(), nodes=cluster.state("nodes"))
    print(f"\n[multinode] submit -> node killed {record['kill'] - record['submitted']:.0f} s; "
          f"node killed -> next epoch registered {record['next_epoch'] - record['kill']:.1f} s; "
          f"kill -> job done {record['done'] - record['kill']:.0f} s; checkpoints {record['before_kill']} -> "
          f"{record['after_kill']}")
    return record


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_smoke_study_on_two_nodes(lost_node_study):
    """``ray job submit`` with the README's token step: the job succeeds; trial table, cross-site
    numbers and the exported model as a single-node study gives them."""
    r = lost_node_study
    assert r["returncode"] == 0, r["stdout"][-4000:] + r["stderr"][-2000:]
    assert "succeeded" in r["stdout"] + r["stderr"]
    rows = json.loads((r["study"] / "trials.json").read_text())
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    m = rows[0]["metrics"]
    # mean unseen Dice is the mean of the unseen sites' mean Dice (an independent computation here)
    site_means = [m[f"site/{site}/dice_mean"] for site in UNSEEN]
    assert m["mean_unseen_dice"] == pytest.approx(sum(site_means) / len(site_means), abs=1e-9)
    assert rows[0]["objective"] == m["best_val_dice"]
    assert (r["study"] / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trials_workers_span_both_nodes(lost_node_study, two_nodes):
    cluster = two_nodes[0]
    first = lost_node_study["first_group"]
    assert {w["node_id"] for w in first} == {cluster.head_id, cluster.worker_id}, first
    # the study's own record of the run: 2 DDP workers
    manifest = json.loads((lost_node_study["study"] / "study.json").read_text())
    assert manifest["resources"]["workers_per_trial"] == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_node_restarts_the_workers_from_the_last_checkpoint_on_the_nodes_left(lost_node_study, two_nodes):
    import mlflow

    cluster = two_nodes[0]
    r = lost_node_study
    assert r["returncode"] == 0, r["stdout"][-4000:] + r["stderr"][-2000:]
    # The worker node is gone; the trial's second worker group ran on the head only.
    dead = {n["node_id"] for n in r["nodes"] if n["state"] == "DEAD"}
    assert cluster.worker_id in dead and not r["node_survivors"], r["node_survivors"]
    first_ids = {w["actor_id"] for w in r["first_group"]}
    restarted = [w for w in r["workers"] if w["actor_id"] not in first_ids]
    assert len(restarted) == 2 and {w["node_id"] for w in restarted} == {cluster.head_id}, r["workers"]
    # From the checkpoint registered before the kill, not from scratch: its epochs continue.
    assert r["before_kill"] == ["epoch_0000"] and r["after_kill"][-1] == "epoch_0001", r["after_kill"]
    # Exactly one MLflow run for the trial, which says where it resumed.
    manifest = json.loads((r["study"] / "study.json").read_text())
    client = mlflow.MlflowClient(manifest["tracking_uri"])
    parent = client.get_run(manifest["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id], max_results=100)
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 2 and len(children) == 1, [x.info.run_name for x in runs]
    history = client.get_metric_history(children[0].info.run_id, "resumed_from_epoch")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.0), (2, 1.0)]
    assert {m.value for m in client.get_metric_history(children[0].info.run_id, "world_size")} == {2.0}
