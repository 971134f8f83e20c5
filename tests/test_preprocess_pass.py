"""The study driver's one-pass preprocessing on a real local Ray runtime (a private head, as a study
starts one): each case written once, a second pass writes nothing, an edited scan is preprocessed
again, and a scan that breaks after the preflight stops the study before any trial with its file
named. That a whole study's trials only read the cache its pass wrote is checked on the shared smoke
study (tests/test_study.py). Each scenario runs in a fresh interpreter (Ray reads its auth token once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PASS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from studies.local_cluster import reserve_auth, study_cluster
    reserve_auth()
    from studies.preflight import build_parser, prepare
    from studies.tune import connect

    root, storage, out = sys.argv[1:4]
    args = build_parser().parse_args(["--smoke-test", "--data", root, "--storage-path", storage,
                                      "--set", f"data.cache_dir={storage}/cache", "--set", "data.val_fraction=0.4"])
    plan = prepare(args)
    plan.cfg.data.root = root
    with study_cluster(None) as address:
        connect(address, log_to_driver=False)
        from studies.preprocess import prepare_data
        results = []
        for i in range(int(sys.argv[4])):
            if i == 2:  # an edited scan: new content, new mtime
                scan = Path(sys.argv[5])
                scan.write_bytes(scan.read_bytes())
            done = prepare_data(plan.cfg, plan.study_dir)
            folder = Path(done.cache_dirs[0])
            results.append({"written": done.written, "cases": done.cases, "folder": str(folder),
                            "files": {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}})
    Path(out).write_text(json.dumps(results))
""")

CORRUPT_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from studies.local_cluster import reserve_auth, study_cluster
    reserve_auth()
    from studies.preflight import StudyError, build_parser, prepare
    from studies.tune import run_study

    root, storage, scan = sys.argv[1:4]
    args = build_parser().parse_args(["--smoke-test", "--data", root, "--storage-path", storage, "--num-samples", "1",
                                      "--set", f"data.cache_dir={storage}/cache", "--no-export"])
    plan = prepare(args)                    # the preflight reads every file: all good
    data = Path(scan).read_bytes()
    Path(scan).write_bytes(data[: len(data) // 3])   # then the scan breaks (a copy cut short on shared storage)
    with study_cluster(None) as address:
        args.address = address
        try:
            run_study(args, plan)
        except StudyError as exc:
            print("STUDY-ERROR", exc)
            sys.exit(2)
    sys.exit(0)
""")


def _run(script: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def dataset(phantom_root, tmp_path) -> Path:
    """A private copy of the session phantom (the tests edit its files)."""
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns(".dualssl_cache"))
    return root


def _source_split(root: Path):
    from dualssl.config import Config
    from dualssl.data.datalist import load_datalist, split_cases

    cfg = Config()
    return split_cases(load_datalist(root), cfg.data.source_sites, 0.4, cfg.data.split_seed)


def _source_cases(root: Path) -> list:
    split = _source_split(root)
    return split.train + split.val


def _evaluated_cases(root: Path) -> list:
    """The cases a trial's cross-site evaluation reads besides its source validation cases (every
    case of the other sites)."""
    split = _source_split(root)
    return [c for site in sorted(split.test) for c in split.test[site]]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_pass_writes_each_case_once_a_second_writes_nothing_and_an_edit_one(dataset, tmp_path):
    """A whole study's pass into a fresh cache, and its trials only reading it, are checked on the
    shared smoke study (tests/test_study.py::test_smoke_study_preprocesses_each_case_once_before_any_trial...)."""
    storage = tmp_path / "studies"
    source = _source_cases(dataset)
    unseen = _evaluated_cases(dataset)
    cases = source + unseen  # every case a trial reads or evaluates
    edited = source[0].image
    out = tmp_path / "passes.json"
    done = _run(PASS_SCRIPT, str(dataset), str(storage), str(out), "3", edited)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second, third = json.loads(out.read_text())
    # pass 1: one file per case a trial reads (the source site's training and validation cases) or
    # evaluates (every case of the unseen sites), no temp files
    assert first["cases"] == len(cases) and first["written"] == len(cases)
    assert len(first["files"]) == len(cases) and all(n.endswith(".pt") for n in first["files"])
    # pass 2: nothing written, every file untouched
    assert second["written"] == 0 and second["files"] == first["files"]
    # pass 3 after one scan was rewritten: that case alone again (a new key), the others untouched
    assert third["written"] == 1 and len(third["files"]) == len(cases) + 1
    assert {k: v for k, v in third["files"].items() if k in first["files"]} == first["files"]
    assert "spacing X,Y,Z" in done.stdout and (storage / "dualssl-smoke" / "fingerprint" / "fingerprint.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_scan_that_breaks_after_the_preflight_stops_the_study_before_any_trial(dataset, tmp_path):
    storage = tmp_path / "studies"
    scan = _source_cases(dataset)[1].image
    done = _run(CORRUPT_SCRIPT, str(dataset), str(storage), scan)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "STUDY-ERROR" in done.stdout and scan in done.stdout
    experiment = storage / "dualssl-smoke"
    assert not list(experiment.glob("trial_*")) and not (experiment / "train_runs").exists()
    assert not (experiment / "study.json").exists()  # no MLflow parent run, no manifest: nothing started
