"""MLflow writes that wait, in order and on disk, while the tracking server does not answer.

The driver logs every trial's run (:class:`studies.tracking.TrialRuns`). A tracking server that is
briefly down (restarted, a network blip, a database failover) must not stop the study, and what the
trials report meanwhile must not be lost:

* a write that fails with a transient error (no connection, a timeout, a 5xx, a locked database) is
  queued, and so is every later write, so the order per run is kept;
* while writes wait they are kept in a JSON-lines journal (the study folder's
  ``mlflow-pending.jsonl``); a driver killed during the outage leaves it, and the next driver on the
  same study folder (``tune.py --resume``) replays it before anything else;
* the queue is retried at most every ``retry_s`` seconds (each try costs at most MLflow's own
  retries, kept short by :func:`client_defaults`), and once more with a deadline at the study's end;
* a write the server refuses (a 4xx code such as ``INVALID_PARAMETER_VALUE``) is not retried: it is
  dropped with one printed line that names it.

A write is a JSON-able dict with a ``kind``; ``apply`` (given by the owner) performs it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

JOURNAL_NAME = "mlflow-pending.jsonl"
REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                     "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND"})
"""MLflow error codes of a request the server understood and refused: retrying cannot help."""

CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's HTTP client retries 7 times with backoff factor 2 (about 4 minutes per call) by default,
which would hold the Tune driver's event loop for minutes on every write of an outage; with these a
failing write returns within seconds and waits in the queue instead."""


def client_defaults() -> None:
    """Short MLflow HTTP retries for the driver (:data:`CLIENT_DEFAULTS`) unless the user set them."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def is_transient(exc: BaseException) -> bool:
    """True when the server may answer a retry: no answer at all, or an error that is not a refusal."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in REFUSED
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in (
        "requests", "urllib3", "sqlalchemy", "psycopg2")


def describe(op: dict[str, Any]) -> str:
    return f"{op.get('kind')} of trial {op.get('trial_id', '?')}" + (
        f" (step {op['step']})" if "step" in op else "")


class PendingWrites:
    """An ordered queue of MLflow writes in front of ``apply``; see the module docstring.

    ``submit`` performs a write now when nothing waits (and the server answers), else queues it;
    ``drain`` retries until the queue is empty or ``timeout_s`` has passed."""

    def __init__(self, apply: Callable[[dict[str, Any]], None], journal: Path | None = None,
                 retry_s: float = 30.0, where: str = "the tracking server"):
        self.apply, self.journal, self.retry_s, self.where = apply, journal, retry_s, where
        self.queue: list[dict[str, Any]] = self._load()
        self.down_since: float | None = None
        self.logged_late = 0
        self._next_try = 0.0
        if self.queue:
            print(f"[study] {len(self.queue)} MLflow writes of an earlier driver wait in {self.journal}; "
                  "logging them first", flush=True)

    def __len__(self) -> int:
        return len(self.queue)

    def submit(self, op: dict[str, Any]) -> bool:
        """Queue ``op`` behind anything waiting and try the queue; True when nothing waits after."""
        self.queue.append(op)
        if len(self.queue) > 1:
            self._append(op)
        return self.flush()

    def flush(self, force: bool = False) -> bool:
        """Perform waiting writes in order (not before the retry time unless ``force``)."""
        if not self.queue:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        while self.queue:
            op = self.queue[0]
            try:
                self.apply(op)
            except Exception as exc:  # noqa: BLE001 (classified: refused writes are dropped, others wait)
                if is_transient(exc):
                    self._outage(exc)
                    return False
                print(f"[study] MLflow refused the {describe(op)}; dropped: {exc}", flush=True)
            else:
                if self.down_since is not None:
                    self.logged_late += 1
            self.queue.pop(0)
        self._recovered()
        return True

    def drain(self, timeout_s: float) -> bool:
        """Retry until every write is performed (True) or ``timeout_s`` has passed (False: the
        journal keeps what waits, for the next driver)."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True):
            if time.monotonic() >= deadline:
                where = f"; they stay in {self.journal} for the next driver (--resume)" if self.journal else ""
                print(f"[study] {self.where} did not answer for {timeout_s:.0f} s: {len(self.queue)} MLflow "
                      f"writes not logged{where}", flush=True)
                return False
            time.sleep(max(0.5, min(self.retry_s, deadline - time.monotonic())))
        return True

    # -- outage bookkeeping ----------------------------------------------------------------------
    def _outage(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_s
        self._save()
        if self.down_since is None:
            self.down_since = time.monotonic()
            kept = f", kept in {self.journal}" if self.journal else ""
            print(f"[study] {self.where} does not answer ({type(exc).__name__}: {str(exc)[:160]}); trials go "
                  f"on, their MLflow writes wait{kept} and are retried every {self.retry_s:.0f} s", flush=True)

    def _recovered(self) -> None:
        if self.journal is not None and self.journal.is_file():
            self.journal.unlink()
        if self.down_since is not None:
            print(f"[study] {self.where} answers again after {time.monotonic() - self.down_since:.0f} s: "
                  f"{self.logged_late} waiting MLflow writes logged", flush=True)
        self.down_since, self.logged_late = None, 0

    # -- the journal -----------------------------------------------------------------------------
    def _load(self) -> list[dict[str, Any]]:
        if self.journal is None or not self.journal.is_file():
            return []
        ops = []
        for line in self.journal.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed driver: the last one only
                print(f"[study] {self.journal}: skipping a truncated line", flush=True)
        return ops

    def _save(self) -> None:
        if self.journal is None:
            return
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op, default=str) + "\n" for op in self.queue))
        os.replace(tmp, self.journal)

    def _append(self, op: dict[str, Any]) -> None:
        if self.journal is not None and self.journal.is_file():
            with open(self.journal, "a") as f:
                f.write(json.dumps(op, default=str) + "\n")
