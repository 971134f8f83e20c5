"""Two studies must not share one Ray Tune folder (``<storage>/<experiment>``): the second one's Tuner state
would replace the first's, so ``--resume`` of the first would restore the wrong study. The study that
uses the folder claims it; another ``--study-dir`` there is refused on the driver, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from studies.preflight import OWNER_FILE, claim_storage, storage_owner_problem

REPO = Path(__file__).resolve().parents[1]


def test_a_claimed_tune_folder_refuses_another_study_dir_only(tmp_path):
    storage, first, second = str(tmp_path / "studies"), tmp_path / "first", tmp_path / "second"
    assert storage_owner_problem(storage, "exp", first) is None  # nobody's yet
    claim_storage(storage, "exp", first)
    assert (tmp_path / "studies" / "exp" / OWNER_FILE).read_text() == str(first)
    assert storage_owner_problem(storage, "exp", first) is None  # the same study (--resume)
    assert storage_owner_problem(storage, "other-exp", second) is None
    problem = storage_owner_problem(storage, "exp", second)
    assert problem and str(first) in problem and "--experiment-name" in problem and str(second) in problem
    assert storage_owner_problem("s3://bucket/studies", "exp", second) is None  # remote storage: not checked


def test_tune_refuses_a_second_study_dir_in_a_claimed_folder_before_starting_anything(tmp_path):
    storage = tmp_path / "studies"
    claim_storage(str(storage), "dualssl-smoke", tmp_path / "first")
    second = tmp_path / "second"
    done = subprocess.run([sys.executable, str(REPO / "studies" / "tune.py"), "--smoke-test",
                           "--storage-path", str(storage), "--study-dir", str(second)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"belongs to the study in {tmp_path / 'first'}" in done.stderr
    assert not second.exists() and sorted(p.name for p in (storage / "dualssl-smoke").iterdir()) == [OWNER_FILE]
