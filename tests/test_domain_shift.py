"""The domain-shift study: preflight errors (fast) and the smoke study end to end (slow: a real private
Ray head, Ray Train cells, a real MLflow sqlite store, the report)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from studies.domain_shift import build_parser, make_cells, parse_seeds, prepare  # noqa: E402
from studies.tune import StudyError  # noqa: E402


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_cells_are_the_product_of_arms_seeds_and_sources():
    cells = make_cells({"plain": {"loss.lambda_con": 0.0}, "dual": {"loss.lambda_con": 0.1}}, [0, 1],
                       ["a", "b"])
    assert len(cells) == 8
    assert {(c["study.arm"], c["optim.seed"], c["data.source_sites"][0]) for c in cells} == {
        (arm, seed, src) for arm in ("plain", "dual") for seed in (0, 1) for src in ("a", "b")}
    assert len({c["study.cell"] for c in cells}) == 8
    assert [c["loss.lambda_con"] for c in cells if c["study.arm"] == "dual"] == [0.1] * 4


def test_seeds_flag_takes_a_count_or_a_list():
    assert parse_seeds(None, smoke=False) == [0, 1, 2]
    assert parse_seeds(None, smoke=True) == [0, 1]
    assert parse_seeds("5", smoke=False) == [0, 1, 2, 3, 4]
    assert parse_seeds("7,11", smoke=False) == [7, 11]


def test_preflight_names_every_problem_at_once(tmp_path, phantom_root):
    with pytest.raises(StudyError) as info:
        prepare(_args("--data", str(phantom_root), "--arms", "plain,duall", "--source-sites", "nowhere",
                      "--seeds", "x", "--storage-path", str(tmp_path)))
    message = str(info.value)
    assert "--arms: unknown arm(s) duall" in message and "known: plain" in message
    assert "--source-sites nowhere" in message and "cone_beam" in message  # lists the dataset's sites
    assert "--seeds x" in message
    assert not (tmp_path / "dualssl-domain-shift").exists()  # nothing written


def test_arms_file_adds_an_arm_and_from_study_needs_dual(tmp_path, phantom_root):
    arms = tmp_path / "arms.yaml"
    arms.write_text("heavy_con:\n  loss.lambda_con: 1.0\n  loss.lambda_rec: 0.0\n")
    plan = prepare(_args("--data", str(phantom_root), "--arms", "plain,heavy_con", "--arms-file", str(arms),
                         "--storage-path", str(tmp_path)))
    assert plan.arms["heavy_con"] == {"loss.lambda_con": 1.0, "loss.lambda_rec": 0.0}
    assert len(plan.cells) == 2 * 3 and plan.source_sites == ["pv_standard"]
    with pytest.raises(StudyError, match="has no 'dual'"):
        prepare(_args("--data", str(phantom_root), "--arms", "plain", "--from-study", str(tmp_path),
                      "--storage-path", str(tmp_path)))


def _tune_study(folder: Path, selection: str) -> Path:
    """A finished tune.py study folder as tune.py writes it (study.json via finish.write_manifest,
    trials.json/trials.csv via finish.write_table), holding two trials."""
    from studies.finish import write_manifest, write_table

    folder.mkdir(parents=True)
    rows = [{"trial_id": "a0001", "status": "completed", "objective": 0.41, "config_hash": "x",
             "params": {"loss.lambda_con": 0.3, "loss.lambda_rec": 0.05, "loss.tau": 0.2},
             "metrics": {"best_val_dice": 0.41}},
            {"trial_id": "a0002", "status": "completed", "objective": 0.30, "config_hash": "y",
             "params": {"loss.lambda_con": 0.01, "loss.lambda_rec": 0.5, "loss.tau": 0.1},
             "metrics": {"best_val_dice": 0.30}}]
    write_table(folder, rows)
    write_manifest(folder, {"experiment": folder.name, "study_dir": str(folder), "selection": selection,
                            "selection_metric": "val_dice", "searched": ["loss.lambda_con", "loss.lambda_rec",
                                                                         "loss.tau"], "best_trial_id": "a0001"})
    return folder


def test_from_study_refuses_an_oracle_selected_study(tmp_path, phantom_root):
    oracle = _tune_study(tmp_path / "oracle-study", "oracle")
    with pytest.raises(StudyError) as info:
        prepare(_args("--data", str(phantom_root), "--from-study", str(oracle), "--storage-path", str(tmp_path)))
    message = str(info.value)
    assert f"--from-study {oracle}" in message and "oracle-selected" in message
    assert "--selection source-val" in message  # the fix


def test_report_rows_say_where_each_arm_came_from_and_what_it_changes(tmp_path, phantom_root):
    fair = _tune_study(tmp_path / "fair-study", "source-val")
    arms = tmp_path / "arms.yaml"
    arms.write_text("heavy_con:\n  loss.lambda_con: 1.0\n  loss.lambda_rec: 0.0\n")
    plan = prepare(_args("--data", str(phantom_root), "--arms", "plain,dual,heavy_con", "--arms-file", str(arms),
                         "--from-study", str(fair), "--storage-path", str(tmp_path)))
    assert {k: plan.arms["dual"][k] for k in ("loss.lambda_con", "loss.lambda_rec", "loss.tau")} == {
        "loss.lambda_con": 0.3, "loss.lambda_rec": 0.05, "loss.tau": 0.2}
    rows = {r["arm"]: r for r in plan.arm_rows}
    assert rows["plain"]["settings_from"].startswith("default recipe")
    assert rows["plain"]["differences"] == "none (the reference)"
    assert f"--from-study {fair} (trial a0001" in rows["dual"]["settings_from"]
    assert rows["heavy_con"]["settings_from"] == f"--arms-file {arms}"
    # resolved on the study's base config: plain switches both SSL branches off, so these differ
    assert "loss.lambda_con: 0.0 -> 0.3" in rows["dual"]["differences"]
    assert "loss.tau: " in rows["dual"]["differences"]
    assert rows["heavy_con"]["differences"] == "loss.lambda_con: 0.0 -> 1.0"


def test_leave_one_site_out_trains_on_every_site(tmp_path, phantom_root):
    plan = prepare(_args("--data", str(phantom_root), "--leave-one-site-out", "--seeds", "1",
                         "--storage-path", str(tmp_path)))
    assert plan.source_sites == ["cone_beam", "native_thick", "pv_standard"]
    assert len(plan.cells) == 2 * 3  # 2 arms x 1 seed x 3 sources


MAX_LINES = 250
"""What the smoke study may print without --verbose (issue 25: it printed 2,117 lines at default size)."""
BROKEN_ARM = ("broken:\n  loss.lambda_con: 0.0\n  loss.lambda_rec: 0.0\n  optim.lr: 1.0e+30\n  optim.grad_clip: 0.0\n"
              "  optim.max_nonfinite_steps: 1\n")
"""An arm whose config validates on the driver but whose training diverges inside the trial: the first
update at lr 1e30 (no clipping) overflows the weights, the next step is not finite and the engine raises
FloatingPointError. (An unwritable cache folder no longer reaches a trial: the driver's one-pass
preprocessing stops the study on it before any trial starts, studies/preprocess.py.)"""


@pytest.fixture(scope="module")
def smoke_study(phantom_root, tmp_path_factory):
    """One smoke study shared by the end-to-end checks: plain and dual x 2 seeds finish; the
    ``broken`` arm's 2 cells fail inside their trials. (completed process, study folder)."""
    tmp_path = tmp_path_factory.mktemp("smoke-study")
    arms = tmp_path / "arms.yaml"
    arms.write_text(BROKEN_ARM)
    storage = tmp_path / "studies"
    log = tmp_path / "terminal.txt"  # kept for a look when the run times out
    done = subprocess.run([sys.executable, str(REPO / "studies" / "domain_shift.py"), "--smoke-test", "--epochs", "1",
                           "--data", str(phantom_root), "--storage-path", str(storage),
                           "--arms", "plain,dual,broken", "--arms-file", str(arms),
                           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--n-boot", "500",
                           # no worker-group restarts: the broken cells fail at once (Tune still retries once)
                           "--max-failures", "0",
                           # two cells at a time, one worker each: their start-ups overlap on 2 cores
                           "--max-concurrent-trials", "2", "--workers-per-trial", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    log.write_text(done.stdout + done.stderr)
    return done, storage / "dualssl-domain-shift-smoke"


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_smoke_study_gives_one_run_per_cell_and_a_report(smoke_study):
    import mlflow

    done, study = smoke_study
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # 2 cells failed: non-zero
    manifest = json.loads((study / "study.json").read_text())
    assert manifest["cells_done"] == 4

    # MLflow: one parent, exactly one nested run per cell, tagged with its arm, seed and source site.
    client = mlflow.MlflowClient(manifest["tracking_uri"])
    parent = client.get_run(manifest["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in children) == [
        ("broken", "0"), ("broken", "1"), ("dual", "0"), ("dual", "1"), ("plain", "0"), ("plain", "1")]
    assert all(r.data.tags["source_site"] == "pv_standard" for r in children)
    for run in children:
        if run.data.tags["arm"] == "broken":
            continue
        for site in ("cone_beam", "native_thick"):
            assert f"site/{site}/dice_mean" in run.data.metrics
            # distances come with the misses beside them, and a variant that penalises them
            assert {f"site/{site}/n_missed", f"site/{site}/hd95_penalised_mean"} <= set(run.data.metrics)
    assert float(children[0].data.params["loss.lambda_con"]) in (0.0, 0.1)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= logged
    # the sqlite default keeps the artifacts in the study folder, not in the driver's ./mlruns
    assert parent.info.artifact_uri.startswith((study / "mlartifacts").as_uri()), parent.info.artifact_uri

    # The case table: every finished cell scored every case of the unseen sites and its source validation.
    with open(study / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cells = {r["cell"] for r in rows}
    assert len(cells) == 4
    unseen_per_cell = {c: sorted(r["case_id"] for r in rows if r["cell"] == c and r["role"] == "unseen")
                       for c in cells}
    expected = sorted(f"{site}_{i:03d}" for site in ("cone_beam", "native_thick") for i in range(5))
    assert all(ids == expected for ids in unseen_per_cell.values()), unseen_per_cell
    assert all(float(r["hd95_penalised"]) >= 0 and r["missed"] in ("0", "1") for r in rows)
    html = (study / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "dual" in html and "plain" in html
    # the data pass's fingerprint: a section of the HTML report (table + figure) and the parent's artifacts
    assert "<h2>Dataset fingerprint</h2>" in html and "native_thick" in html.split("<h2>Dataset fingerprint</h2>")[1]
    assert {"fingerprint/fingerprint.json", "fingerprint/fingerprint.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "fingerprint")}


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_a_failed_cell_is_named_in_the_report_and_on_the_mlflow_parent(smoke_study):
    import mlflow

    done, study = smoke_study
    failed = ["broken-s0-pv_standard", "broken-s1-pv_standard"]
    text = (study / "report" / "report.md").read_text()
    assert "## Cells that did not finish (2 of 6)" in text
    assert all(cell in text for cell in failed) and "FloatingPointError" in text
    assert "## Arms" in text and "optim.lr" in text  # broken's resolved difference from plain
    manifest = json.loads((study / "study.json").read_text())
    parent = mlflow.MlflowClient(manifest["tracking_uri"]).get_run(manifest["parent_run_id"])
    assert parent.data.tags["cells_failed"] == "2 of 6"
    assert sorted(parent.data.tags["failed_cells"].split(", ")) == failed
    assert all(f"{cell} FAILED" in done.stdout for cell in failed)


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_a_second_study_dir_in_the_smoke_studys_tune_folder_is_refused(smoke_study, phantom_root, tmp_path):
    """The smoke study claimed its Ray Tune folder; another --study-dir with the same storage and
    experiment name would have overwritten its Tuner state (a wrong --resume later): refused at once."""
    _, folder = smoke_study
    other = tmp_path / "other-study"
    done = subprocess.run([sys.executable, str(REPO / "studies" / "domain_shift.py"), "--smoke-test",
                           "--data", str(phantom_root), "--storage-path", str(folder.parent), "--study-dir", str(other)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"belongs to the study in {folder}" in done.stderr and "--experiment-name" in done.stderr
    assert not other.exists()


def test_the_smoke_study_prints_a_short_readable_terminal(smoke_study):
    done, study = smoke_study
    printed = done.stdout + done.stderr
    lines = printed.count("\n")
    assert lines <= MAX_LINES, f"{lines} lines:\n{printed[-5000:]}"
    assert "╭" not in printed and "Trial trial_" not in printed  # Ray's boxes only under --verbose
    assert "cell  " in printed and "val Dice" in printed  # the progress table
    finished = [line for line in done.stdout.splitlines() if " finished (" in line and "[domain-shift] cell" in line]
    assert len(finished) == 4
    assert "HD95 pen. mm" in done.stdout and "n_missed" in done.stdout  # the headline, distances with misses
    assert str(study / "report" / "report.html") in done.stdout


def test_terminal_headline_puts_n_missed_beside_hd95(tmp_path):
    """The headline the study prints, from a real report of a hand-built table (tests/test_report_failed_cells)."""
    from dualssl.report import write_report
    from studies.shift_console import report_headline
    from test_report_failed_cells import _rows

    rows = _rows()
    paths = {k: str(v) for k, v in write_report(rows, tmp_path, "t", n_boot=100).items()}
    lines = report_headline(paths, rows, phantom=True)
    assert "test fixture, not evidence about real hospitals" in lines[0]
    assert "HD95 pen. mm" in lines[1] and "n_missed" in lines[1]
    by_arm = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(by_arm) == {"plain", "dual", "gin"}
    assert by_arm["dual"][-1] == "6" and by_arm["plain"][-1] == "0"  # dual missed 6 cases
    assert by_arm["dual"][-2] == "3.00"  # its HD95 on the cases it found
    assert by_arm["plain"][5] == "-"  # no difference of the reference with itself
