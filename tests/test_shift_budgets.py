"""The domain-shift study's budget axis (``--budgets``, ``--reference``): expansion of the arms, the
preflight's refusals and a cell's budget in ``cells.csv`` (end to end: tests/test_nnunet.py's study)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.config import Config, ConfigError  # noqa: E402
from dualssl.recipes import apply_recipe  # noqa: E402
from studies.domain_shift import build_parser, prepare  # noqa: E402
from studies.shift_budgets import budget_epochs, expand_arms, parse_budgets  # noqa: E402
from studies.tune import StudyError  # noqa: E402


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_budgets_flag_takes_a_list_of_positive_iterations():
    assert parse_budgets(None) == []
    assert parse_budgets("100, 300,1000") == [100, 300, 1000]
    for bad, words in (("x", "comma list of positive integers"), ("0,10", "positive number"),
                       ("10,10", "named twice")):
        with pytest.raises(ConfigError, match=words):
            parse_budgets(bad)


def test_a_budget_runs_as_whole_epochs_or_is_refused_with_the_fix():
    assert budget_epochs(300, 10) == 30
    with pytest.raises(ConfigError) as info:
        budget_epochs(25, 10)
    message = str(info.value)
    assert message.startswith("--budgets: 25 is not a positive multiple of optim.steps_per_epoch = 10")
    assert "such as 20 or 30" in message and "--set optim.steps_per_epoch=N" in message
    with pytest.raises(ConfigError, match="steps_per_epoch is 0 .*--set optim.steps_per_epoch=10"):
        budget_epochs(100, 0)


def test_each_arm_at_each_budget_is_its_own_arm():
    arms = {"plain": {"loss.lambda_con": 0.0}, "nnunet": {"loss.lambda_con": 0.0, "study.peer": "nnunet"}}
    out, origin = expand_arms(arms, {"plain": "default", "nnunet": "peer"}, [100, 300], 10)
    assert list(out) == ["plain@100", "nnunet@100", "plain@300", "nnunet@300"]
    assert out["nnunet@300"] == {"loss.lambda_con": 0.0, "study.peer": "nnunet", "optim.epochs": 30,
                                 "study.budget": 300}
    assert out["plain@100"]["optim.epochs"] == 10
    assert origin["plain@300"].startswith("default; budget 300 iterations = 30 epoch(s) x 10")
    assert expand_arms(arms, {}, [], 10) == (arms, {})  # no --budgets: nothing changes


def test_budgeted_cells_train_their_budget_and_carry_its_label(tmp_path, phantom_root):
    """Every cell of ``--budgets`` resolves (through the trainable's own ``split_config``) to
    budget / steps_per_epoch epochs, its ``study.budget`` label a trial setting."""
    from studies.trainable import TrialSettings, cell_tags, split_config, study_config

    plan = prepare(_args("--smoke-test", "--data", str(phantom_root), "--arms", "plain,dual", "--seeds", "2",
                         "--budgets", "4,8", "--storage-path", str(tmp_path)))
    assert plan.cfg.optim.steps_per_epoch == 4 and plan.budgets == [4, 8] and plan.reference == "plain"
    assert list(plan.arms) == ["plain@4", "dual@4", "plain@8", "dual@8"]
    assert len(plan.cells) == 4 * 2
    for cell in plan.cells:
        cfg, settings = split_config({**study_config(plan.cfg, TrialSettings(), {}), "study.overrides": cell})
        assert settings.budget == cell["study.budget"] and settings.arm == cell["study.arm"]
        assert cfg.optim.epochs * cfg.optim.steps_per_epoch == settings.budget
        assert settings.arm.endswith(f"@{settings.budget}")
        assert cell_tags(cfg, settings)["budget"] == str(settings.budget)  # the MLflow tag of the cell's run
    rows = {r["arm"]: r for r in plan.arm_rows}
    # compared with the reference at the same budget: the budget itself is no difference
    assert rows["plain@8"]["differences"] == "none (the reference)"
    assert rows["dual@8"]["differences"].startswith("loss.lambda_con: 0.0 -> 0.1")
    assert "optim.epochs" not in rows["dual@8"]["differences"] and "study.budget" not in rows["dual@8"]["differences"]
    no_plain = prepare(_args("--smoke-test", "--data", str(phantom_root), "--arms", "dual,gin", "--budgets", "8",
                             "--storage-path", str(tmp_path)))  # the default reference need not be an arm
    assert [r["arm"] for r in no_plain.arm_rows] == ["dual@8", "gin@8"]
    assert no_plain.arm_rows[1]["differences"] == "data.domain_aug: none -> gin"  # vs plain's recipe at 8
    plain = prepare(_args("--smoke-test", "--data", str(phantom_root), "--arms", "plain,dual",
                          "--reference", "dual", "--storage-path", str(tmp_path)))
    assert list(plain.arms) == ["plain", "dual"] and all("study.budget" not in c for c in plain.cells)
    assert {r["arm"]: r["differences"] for r in plain.arm_rows}["dual"] == "none (the reference)"


def test_preflight_refuses_bad_budgets_and_reference_all_at_once(tmp_path, phantom_root):
    with pytest.raises(StudyError) as info:
        prepare(_args("--smoke-test", "--data", str(phantom_root), "--arms", "plain,dual", "--budgets", "4,6",
                      "--epochs", "3", "--reference", "gin", "--storage-path", str(tmp_path)))
    message = str(info.value)
    assert "--reference gin: not an arm of this study" in message and "plain, dual" in message
    assert "--budgets: 6 is not a positive multiple of optim.steps_per_epoch = 4" in message
    assert "--epochs and --budgets both set the training length" in message
    assert not (tmp_path / "dualssl-domain-shift-smoke").exists()  # nothing written
    arms = tmp_path / "arms.yaml"
    arms.write_text("a@b:\n  loss.lambda_con: 0.0\n")
    with pytest.raises(StudyError, match="a@b: an arm name with '@' is ambiguous"):
        prepare(_args("--smoke-test", "--data", str(phantom_root), "--arms", "plain,a@b", "--arms-file", str(arms),
                      "--budgets", "4", "--storage-path", str(tmp_path)))
    with pytest.raises(StudyError, match="--budgets x: give a comma list"):
        prepare(_args("--smoke-test", "--data", str(phantom_root), "--budgets", "x", "--storage-path", str(tmp_path)))


def test_a_cells_budget_in_cells_csv(tmp_path):
    """Our engine's budget from the cell's config; an nnU-Net cell's from its own plan (trial.json as
    ``studies/trainable.py`` writes it from ``studies/peer_cell.py``'s info)."""
    from studies.shift_table import budget_columns
    from studies.trainable import TrialSettings

    cfg = apply_recipe(Config(), "smoke").validate()  # 2 epochs x 4 steps, batch 1 x 2 patches of 32x32x16
    ours = budget_columns(cfg, TrialSettings(workers=2, budget=8), {"time_total_s": 41.5, "time/trial_s": 40.0},
                          None)
    assert ours == {"budget": 8, "budget_iterations": 8, "wall_s": 41.5, "batch_size": 4,
                    "patch_size": "32x32x16", "patch_voxels": 32 * 32 * 16, "system": "dualssl engine"}
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / "trial.json").write_text(json.dumps({
        "trial_id": "t1", "settings": {"iterations": 10, "iterations_per_epoch": 4}, "patch_size": [32, 64, 64],
        "batch_size": 2, "plan_label": "nnU-Net pipeline, capped plan"}))
    peer = budget_columns(cfg, TrialSettings(peer="nnunet"), {"time/total_s": 90.0}, folder)
    assert peer["budget_iterations"] == 12  # nnU-Net trains whole epochs: 3 x 4
    assert (peer["batch_size"], peer["patch_voxels"], peer["patch_size"], peer["wall_s"]) == (2, 131072, "32x64x64",
                                                                                               90.0)
    assert peer["system"] == "nnunet: nnU-Net pipeline, capped plan" and peer["budget"] == ""
    failed = budget_columns(cfg, TrialSettings(peer="nnunet-da5"), {}, None)
    assert failed["budget_iterations"] == 8 and math.isnan(failed["wall_s"]) and math.isnan(failed["patch_voxels"])
    assert "plan unknown" in failed["system"]

# The budget axis end to end (a budgeted study with --reference, an nnU-Net cell's budget columns,
# the per-budget report, MLflow names and the headline) is tests/test_nnunet.py's study test.
