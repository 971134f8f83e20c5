"""Shared fixtures: one small phantom dataset per test session, and the real data beside the project."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `studies` (not an installed package) for the fixtures and every test
SHARED_DATA = Path(os.environ.get("DUALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Small enough for 2 CPU cores, large enough that a narrow net learns the pancreas.
TEST_SITES = ["pv_standard", "native_thick", "cone_beam"]
TEST_SCALE = 0.3
TEST_CASES_PER_SITE = 5


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout():
    """The session leaves no MLflow store or artifacts in the checkout (the tests run from it, and a
    sqlite store once put every new experiment's artifacts in ./mlruns)."""
    strays = ("mlruns", "mlartifacts", "mlflow.db", "ray_results")
    before = {name for name in strays if (REPO / name).exists()}
    yield
    created = sorted(name for name in strays if (REPO / name).exists() and name not in before)
    assert not created, f"the tests wrote {created} into {REPO}"


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """An MSD-layout phantom with TEST_SITES x TEST_CASES_PER_SITE cases (generated once)."""
    from dualssl.data.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantom") / "dataset"
    return Path(generate_dataset(out, sites=TEST_SITES, cases_per_site=TEST_CASES_PER_SITE,
                                 seed=0, scale=TEST_SCALE))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


# --- a real tracking server: PostgreSQL + `mlflow server`, started by cluster/mlflow/serve.sh ---------

SERVE_SCRIPT = REPO / "cluster" / "mlflow" / "serve.sh"
POSTGRES_PACKAGE = "Debian's postgresql (apt-get install -y postgresql) and psycopg2-binary (pip)"


def _missing(what: str) -> None:
    """Skip outside CI; under CI (CI=true) the tracking-server tests must run, so fail instead."""
    message = f"{what} missing: install {POSTGRES_PACKAGE} (.ci/run does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _postgres_bin() -> Path:
    """Debian's server binaries (/usr/lib/postgresql/N/bin), newest first; /usr/local/bin/initdb may link there."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]), reverse=True)
    initdb = found[0] if found else shutil.which("initdb")
    if not initdb:
        _missing("PostgreSQL's initdb")
    return Path(initdb).resolve().parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, what: str, timeout: float, log: Path | None = None) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except RuntimeError:  # the check saw the server die: no point in waiting
            raise
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.is_file() else ""
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s\n{tail}")


@pytest.fixture(scope="session")
def tracking_postgres():
    """A PostgreSQL cluster on a free loopback port with database ``mlflow``; yields its connection info
    (``host``, ``port``, ``user``, ``dbname``, ``password_file``). PostgreSQL refuses to run as root:
    under root its binaries run as the ``postgres`` user (``runuser -u postgres --``)."""
    import secrets
    import shutil
    import subprocess
    import tempfile

    try:
        import psycopg2
    except ImportError:
        _missing("psycopg2")
    bindir = _postgres_bin()
    as_user: list[str] = []
    home = Path(tempfile.mkdtemp(prefix="dualssl-pg-"))  # not under pytest's 0700 root-only tmp
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(home, "postgres", "postgres")
    password_file = home / "password"
    password_file.write_text(secrets.token_hex(16))
    password_file.chmod(0o600)
    if as_user:
        shutil.chown(password_file, "postgres", "postgres")
    info = {"host": "127.0.0.1", "port": _free_port(), "user": "mlflow", "dbname": "mlflow",
            "password_file": str(password_file)}
    data = home / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", info["user"], "-E", "UTF8",
                    "--auth=scram-sha-256", f"--pwfile={password_file}"], check=True, capture_output=True)
    log = home / "postgres.log"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "start", "-o",
                    f"-h 127.0.0.1 -p {info['port']} -k {home}"], check=True, capture_output=True)
    try:
        def connect(dbname: str):
            return psycopg2.connect(host=info["host"], port=info["port"], user=info["user"], dbname=dbname,
                                    password=password_file.read_text(), connect_timeout=5)

        _wait_for(lambda: connect("postgres").close() is None, "PostgreSQL", 60, log)
        conn = connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield {**info, "connect": lambda: connect(info["dbname"])}
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


class MlflowServer:
    """One ``mlflow server`` process (cluster/mlflow/serve.sh) on PostgreSQL, artifacts under ``root``,
    on a fixed loopback port: ``start()`` and ``stop()`` may be repeated (a server restart)."""

    def __init__(self, postgres: dict, root: Path, port: int | None = None, workers: int = 2):
        self.root, self.port = root, port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                    "MLFLOW_DB_HOST": postgres["host"], "MLFLOW_DB_PORT": str(postgres["port"]),
                    "MLFLOW_DB_PASSWORD_FILE": postgres["password_file"], "MLFLOW_ARTIFACTS": str(root / "artifacts"),
                    "MLFLOW_PORT": str(self.port), "MLFLOW_WORKERS": str(workers)}
        self.log = root / "server.log"
        self.proc = None

    def start(self, timeout: float = 180) -> str:
        import subprocess
        import urllib.request

        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(["bash", str(SERVE_SCRIPT)], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                return r.status == 200

        _wait_for(healthy, f"mlflow server at {self.uri}", timeout, self.log)
        return self.uri

    def stop(self) -> None:
        """SIGTERM to the server's own session (it and its uvicorn workers), then SIGKILL to what is left."""
        from studies.local_cluster import stop_group

        if self.proc is not None:
            stop_group(self.proc, wait_s=30)


@pytest.fixture(scope="session")
def mlflow_server(tracking_postgres, tmp_path_factory) -> str:
    """``mlflow server`` on PostgreSQL, artifacts in a shared temp folder, on 127.0.0.1: its URI.

    Flags and environment come from cluster/mlflow/serve.sh, the recipe the cluster configs run
    (the password travels as a file, never as an argument)."""
    server = MlflowServer(tracking_postgres, tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def study_tracking(request) -> dict | None:
    """Where the shared smoke study logs (tests/test_study.py): ``{"uri": the mlflow_server,
    "postgres": tracking_postgres}``, or None (the study's sqlite default) where PostgreSQL is
    missing outside CI. Under CI a missing PostgreSQL fails here (see ``_missing``)."""
    try:
        return {"uri": request.getfixturevalue("mlflow_server"), "postgres": request.getfixturevalue("tracking_postgres")}
    except pytest.skip.Exception:
        return None
