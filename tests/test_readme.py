"""The README's cluster block, run as written in bash on a fresh HOME (a real Ray head, a real job)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cluster_block() -> str:
    """The bash block after "On a Ray cluster" in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"```bash\n(.*?)```", text[text.index("On a Ray cluster"):], re.S)
    assert match, "README.md: no ```bash block after 'On a Ray cluster'"
    return match.group(1)


def test_cluster_block_sets_token_auth_before_any_ray_command():
    lines = [ln.split("#")[0].strip() for ln in cluster_block().splitlines() if ln.strip()]
    assert lines[0] == "export RAY_AUTH_MODE=token"  # else `ray job submit` finds no token (auth 'disabled')
    assert any(ln.startswith("ray job submit") for ln in lines) and lines[-1] == "ray stop"


@pytest.mark.slow
def test_cluster_block_runs_as_written_on_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    script = "set -euo pipefail\n" + cluster_block()
    if os.geteuid() == 0 and shutil.which("unshare"):
        # its own PID namespace: the block's `ray stop` sees only this head (not other Ray processes on
        # the machine), and the kernel ends whatever a failed block leaves running
        command = ["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script]
    else:
        command = ["bash", "-c", script]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Token authentication is enabled but no authentication token was found" not in output
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-6000:]
    studies = home / "dualssl-studies"
    assert list(studies.glob("*/study.json")), f"no study.json under {studies}"
