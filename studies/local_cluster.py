"""A private single-node Ray cluster for a study run on one machine.

``ray.init()`` without an address joins whatever ``ray start`` last recorded in
``/tmp/ray/ray_current_cluster`` (on a shared machine: someone else's cluster, or a dead one), and
Ray Train's placement-group cleaner finds "its" cluster the same way: with a stale record it
cannot reach the GCS, and the workers' reservation of every trial that ASHA stops is never freed,
so the next trial waits forever. Here the head is started with ``ray start`` on free ports and
``RAY_ADDRESS`` in its environment, which every Ray process it spawns inherits; the head and its
processes form one process group that is stopped as a whole at the end. Call it before ``ray`` is
imported in this process: the driver reads the cluster's auth token from the environment once.

A driver killed outright (SIGKILL, the OOM killer) runs no cleanup, and the head lives in a session of
its own: on Linux the kernel sends ``ray start`` SIGTERM when its driver dies (``PR_SET_PDEATHSIG``), and
``ray start --block`` then stops the GCS, raylet, dashboard, agents and workers, so no private head
outlives its study (tests/test_driver_resume.py).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout holding ``studies/``: put on the private head's PYTHONPATH, so its workers import
``studies`` (trials do, lazily) wherever the study was started from."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_private_head(address: str | None) -> bool:
    """Whether a study must start its own head: neither ``--address`` nor ``RAY_ADDRESS`` (``ray job submit``)."""
    return address is None and not os.environ.get("RAY_ADDRESS")


@contextmanager
def study_cluster(address: str | None) -> Iterator[str | None]:
    """The cluster a study runs on: the given one (yields ``address``), else a private head (yields its
    address). Call :func:`reserve_auth` (via ``needs_private_head``) before ray is first imported."""
    if not needs_private_head(address):
        yield address
        return
    with local_cluster() as private:
        try:
            yield private
        finally:
            _disconnect_driver()


def _disconnect_driver() -> None:
    """``ray.shutdown()`` of this process, before its private head stops: a driver still connected when
    its raylet dies is ended by Ray at once (its buffered output, e.g. the study's last lines, is lost
    and the exit code is not the study's)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def reserve_auth() -> dict[str, str]:
    """This process's token for its private head, put in the environment now: Ray reads
    ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` once, when it is first imported (the driver's preflight may
    import it, e.g. for the search space, before the head is started). Idempotent."""
    if os.environ.get("DUALSSL_PRIVATE_RAY_TOKEN") is None:
        os.environ["DUALSSL_PRIVATE_RAY_TOKEN"] = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["DUALSSL_PRIVATE_RAY_TOKEN"]}
    os.environ.update(auth)
    return auth


@contextmanager
def local_cluster(num_cpus: int | None = None, start_timeout_s: float = 300.0) -> Iterator[str]:
    """Start a Ray head on this machine; yields its address (``127.0.0.1:PORT``)."""
    port, dashboard = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    # Ray's local clusters use token authentication: one fresh token for the head, its processes and
    # this driver (set before `ray` is first imported, which reads it once).
    auth = reserve_auth()
    # No drain on SIGTERM (Ray waits up to 30 s for a draining node, for Serve): a private head has
    # nothing to hand over, and once its driver is gone nobody waits for it.
    env = {**os.environ, **auth, "RAY_ADDRESS": address, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    log = tempfile.NamedTemporaryFile("w+", prefix="dualssl-ray-head-", suffix=".log", delete=False)
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with(os.getpid()))
    try:
        deadline = time.time() + start_timeout_s
        # Ready when its job server answers (the dashboard is up once the GCS and raylet are).
        while not _answers(dashboard, env):
            if head.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"the local Ray head did not start (log {log.name}):\n{log.read()[-2000:]}")
            time.sleep(1)
        saved = {k: os.environ.get(k) for k in auth}
        os.environ.update(auth)
        try:
            yield address
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        stop_group(head)
        forget_head(port)
        log.close()


def _answers(dashboard: int, env: dict[str, str]) -> bool:
    """Whether the head's job server answers; a probe that hangs (a loaded machine: the CLI alone takes
    tens of seconds to import) counts as not yet, not as a failed start."""
    try:
        return subprocess.run(["ray", "job", "list", f"--address=http://127.0.0.1:{dashboard}"], env=env,
                              capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _die_with(parent: int):
    """``preexec_fn`` for the head: SIGTERM to ``ray start`` when ``parent`` (this driver) dies, however
    it dies (Linux ``prctl(PR_SET_PDEATHSIG)``); None where that does not exist. ``ray start --block``
    stops every process of its node on SIGTERM (a SIGKILL would leave the raylet's dashboard and
    runtime-env agents behind). ``prctl`` is looked up here, in the parent: the child between fork
    and exec only calls it."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the driver died before the prctl: no signal will come
            os._exit(1)

    return preexec


def forget_head(port: int) -> None:
    """Remove `ray start`'s record of this head (``ray_current_cluster``) if it still names it, so
    that a later ``ray.init()`` does not look for a cluster that is gone."""
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        if record.read_text().strip().endswith(f":{port}"):
            record.unlink()
    except OSError:
        pass


def stop_group(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """SIGTERM to the process group ``proc`` leads (started with ``start_new_session``), then SIGKILL
    to what is left (a Ray head's gcs_server and dashboard outlive SIGTERM), each followed by up to
    ``wait_s`` for ``proc``; only that group is signalled. Also the tests' clusters and servers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
