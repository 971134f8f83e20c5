"""Helpers of the tests that start Ray clusters and studies as processes and kill parts of them
(tests/test_driver_resume.py, tests/test_multinode.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

MARKER = "DUALSSL_TEST_PROCESS_MARKER"
"""Environment variable a test puts on the processes it starts; everything they spawn inherits it."""


def marked_processes(value: str) -> list[int]:
    """PIDs (not this one) whose environment holds ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


def checkpointed_epochs(train_run: Path) -> list[str]:
    """Checkpoint folders the Train run's controller registered (its snapshot: what a restart resumes from)."""
    try:
        snapshot = json.loads((train_run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", []))


def wait_for(what: str, check, proc: subprocess.Popen, log: Path, timeout: float, every: float = 0.5):
    """``check()``'s first truthy value; fails the test when ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the study exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(every)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
