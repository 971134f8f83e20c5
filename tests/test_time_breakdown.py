"""A trial's time breakdown (studies/throughput.py) on a timeline typed in by hand, and the engine's stamps."""

from __future__ import annotations

import math

import pytest

from dualssl.engine import fit
from dualssl.recipes import recipe_config
from studies.throughput import PHASES, epoch_breakdown, study_fractions, time_breakdown

# A trial that started at t=1000 s: worker group up and first epoch at 1012; two epochs of 5 s
# training + 2 s validation + 1 s callbacks; fit returns at 1029.5; evaluation until 1039.5; final
# report at 1040. An epoch at 990 belongs to an earlier run of the trial (a Tune restart).
HISTORY = [
    {"epoch_start_unix": 990.0, "train_time_s": 50.0, "val_time_s": 50.0, "callback_time_s": 50.0, "steps": 99},
    {"epoch_start_unix": 1012.0, "train_time_s": 5.0, "val_time_s": 2.0, "callback_time_s": 1.0, "steps": 10},
    {"epoch_start_unix": 1020.0, "train_time_s": 5.0, "val_time_s": 2.0, "steps": 10},
]


def test_time_breakdown_matches_the_timeline_by_hand():
    out = time_breakdown(HISTORY, started=1000.0, fit_done=1029.5, eval_done=1039.5, ended=1040.0)
    # startup 12; train 10; validation 4; checkpoint: 1 (epoch 1's callbacks) + the tail after the
    # last epoch ended at 1027 -> 2.5, so 3.5; cross-site 10; other 40 - 39.5 = 0.5
    expected = {"startup": 12.0, "train": 10.0, "validation": 4.0, "checkpoint": 3.5, "crosssite": 10.0, "other": 0.5}
    for phase, seconds in expected.items():
        assert out[f"time/{phase}_s"] == pytest.approx(seconds)
        assert out[f"time/{phase}_frac"] == pytest.approx(seconds / 40.0)
    assert out["time/trial_s"] == 40.0
    assert out["time/steps"] == 20 and out["time/steps_per_s"] == pytest.approx(2.0)
    assert sum(out[f"time/{p}_frac"] for p in PHASES) == pytest.approx(1.0)
    assert "time/startup_workers_s" not in out  # no loop start given


def test_startup_splits_at_the_train_loop_start():
    # the worker group's rank 0 entered the train loop at 1007.5: 7.5 s of Ray start-up, 4.5 s of set-up
    out = time_breakdown(HISTORY, 1000.0, 1029.5, 1039.5, 1040.0, loop_started=1007.5)
    assert out["time/startup_workers_s"] == pytest.approx(7.5) and out["time/startup_setup_s"] == pytest.approx(4.5)
    assert out["time/startup_s"] == pytest.approx(12.0)
    # a loop start outside the start-up (a stale stamp) splits nothing
    assert "time/startup_workers_s" not in time_breakdown(HISTORY, 1000.0, 1029.5, 1039.5, 1040.0, loop_started=1015.0)


def test_epoch_breakdown_of_a_stopped_trial_and_study_fractions():
    results = [{"timestamp": 1012, "time_total_s": 12.0, "epoch_start_unix": 1003.0, "train_time_s": 5.0,
                "val_time_s": 2.0, "steps": 10},
               {"timestamp": 1020, "time_total_s": 20.0, "epoch_start_unix": 1011.0, "train_time_s": 5.0,
                "val_time_s": 2.0, "steps": 10}]
    out = epoch_breakdown(results)
    assert out["time/startup_s"] == pytest.approx(3.0)  # trial started at 1012 - 12 = 1000
    assert out["time/train_s"] == 10.0 and out["time/validation_s"] == 4.0
    assert out["time/other_s"] == pytest.approx(20 - 10 - 4 - 3)
    both = study_fractions([out, {"time/trial_s": 20.0, "time/train_s": 20.0}])
    assert both["train_frac"] == pytest.approx(30 / 40) and both["trial_s"] == 40.0
    assert math.isnan(study_fractions([])["train_frac"])


def test_a_stopped_trial_whose_epochs_carry_the_trial_start_has_an_exact_split_start_up():
    # The trial function started at 1000.4 (Tune's clock says 1000, whole seconds), rank 0 entered
    # the loop at 1009.9, the first epoch began at 1016.2. A Tune restart ran the function again at
    # 1100.25: its first epoch (1118.0, loop at 1110.5) is the one that counts.
    first_run = [{"timestamp": 1024, "time_total_s": 24.0, "epoch_start_unix": 1016.2, "train_time_s": 5.0,
                  "val_time_s": 2.0, "steps": 10, "trial_start_unix": 1000.4, "loop_start_unix": 1009.9}]
    out = epoch_breakdown(first_run)
    assert out["time/startup_s"] == pytest.approx(15.8)
    assert out["time/startup_workers_s"] == pytest.approx(9.5) and out["time/startup_setup_s"] == pytest.approx(6.3)
    restarted = first_run + [
        {"timestamp": 1126, "time_total_s": 50.0, "epoch_start_unix": 1118.0, "train_time_s": 5.0, "val_time_s": 2.0,
         "steps": 10, "trial_start_unix": 1100.25, "loop_start_unix": 1110.5},
        {"timestamp": 1133, "time_total_s": 57.0, "epoch_start_unix": 1126.0, "train_time_s": 5.0, "val_time_s": 2.0,
         "steps": 10, "trial_start_unix": 1100.25, "loop_start_unix": 1110.5}]
    again = epoch_breakdown(restarted)
    assert again["time/startup_s"] == pytest.approx(17.75)
    assert again["time/startup_workers_s"] == pytest.approx(10.25) and again["time/startup_setup_s"] == pytest.approx(7.5)
    # epochs without the trial start (older results): Tune's clock, no split
    plain = [{k: v for k, v in r.items() if k not in ("trial_start_unix", "loop_start_unix")} for r in first_run]
    assert epoch_breakdown(plain)["time/startup_s"] == pytest.approx(16.2) and "time/startup_workers_s" not in epoch_breakdown(plain)


def test_the_engine_stamps_every_epoch_with_its_phase_times(tmp_path):
    from dualssl.data.phantom import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, sites=["pv_standard"], cases_per_site=3, seed=0, scale=0.3)
    cfg = recipe_config("smoke")
    cfg.data.root, cfg.data.source_sites, cfg.data.cache_dir = str(root), ["pv_standard"], str(tmp_path / "cache")
    cfg.optim.epochs, cfg.optim.steps_per_epoch = 2, 2
    result = fit(cfg)
    for h in result.history:
        assert h["train_time_s"] > 0 and h["val_time_s"] > 0 and h["callback_time_s"] >= 0
    assert result.history[0]["epoch_start_unix"] < result.history[1]["epoch_start_unix"]
    assert result.history[1]["epoch_start_unix"] >= result.history[0]["epoch_start_unix"] + result.history[0]["train_time_s"]
