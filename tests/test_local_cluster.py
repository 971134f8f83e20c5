"""The private Ray head a study starts: its workers import ``studies`` from wherever the study was run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])  # the driver finds studies/ as `python /path/studies/x.py` does
    from studies.local_cluster import reserve_auth, study_cluster
    reserve_auth()
    import ray

    @ray.remote(num_cpus=1)
    def where():
        import studies.train_loop  # a lazy import inside a worker, as the trials do
        return studies.train_loop.__file__

    with study_cluster(None) as address:
        ray.init(address=address, log_to_driver=False)
        print("FOUND", ray.get(where.remote(), timeout=120))
    # still connected when the block ends (as studies/domain_shift.py's driver was): study_cluster must
    # disconnect it before the head stops, else Ray ends this process at once and these lines are lost
    print("CONNECTED AFTER", ray.is_initialized())
    print("ALIVE")
""")


@pytest.mark.slow
def test_workers_of_a_private_head_import_studies_when_run_from_another_folder(tmp_path):
    """``python /path/to/studies/domain_shift.py`` from another folder: the trials import ``studies``
    modules lazily inside the workers (``from studies.train_loop import ...``), which failed every cell
    with "No module named 'studies'" when neither the cwd nor PYTHONPATH held the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    found = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("FOUND ")]
    assert found and found[0].startswith(str(REPO / "studies")), done.stdout[-2000:]
    assert "CONNECTED AFTER False" in done.stdout and "ALIVE" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
