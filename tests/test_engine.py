"""The engine on a small phantom: exact resume, weights-only checkpoints, branches switched off, learning."""

from __future__ import annotations

import math

import pytest
import torch

from dualssl.config import Config
from dualssl.engine import Callback, CheckpointSaver, RunSummary, fit, load_checkpoint

# A narrow net on coarse voxels: about a second a step on 2 cores.
TINY = {
    "model.widths": "8,16,32,64",
    "data.spacing": "3,3,4",
    "data.patch_size": "32,32,16",
    "data.batch_size": 1,
    "data.samples_per_volume": 2,
    "optim.lr": 3e-3,
    "optim.epochs": 2,
    "optim.steps_per_epoch": 2,
    "eval.sw_batch_size": 4,
}


def tiny_config(root, tmp_path, **overrides) -> Config:
    cfg = Config().with_overrides({**TINY, **overrides})
    cfg.data.root = str(root)
    cfg.data.source_sites = ["pv_standard"]
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg.validate()


class Crash(Callback):
    """Simulates a crash right after the checkpoint of epoch ``at`` was written."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        if epoch == self.at:
            raise RuntimeError("simulated crash")


RESUME = {"optim.steps_per_epoch": 1, "eval.val_every": 2}
"""One step an epoch still crosses the epoch-0 checkpoint; the whole-volume Dice (deterministic, the
largest cost of an epoch here) only at the last epoch. The patch Dice still runs every epoch, so the
epoch after the checkpoint starts from a model that validation put in eval mode, as in every run."""


def test_resume_after_a_crash_is_exact(phantom_root, tmp_path):
    straight = tmp_path / "straight"
    fit(tiny_config(phantom_root, tmp_path, **RESUME), callbacks=[CheckpointSaver(straight)])

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tiny_config(phantom_root, tmp_path, **RESUME), callbacks=[CheckpointSaver(crashed), Crash(at=0)])
    ckpt = crashed / "checkpoint_latest.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1
    result = fit(tiny_config(phantom_root, tmp_path, **RESUME), callbacks=[CheckpointSaver(crashed)], resume_from=ckpt)

    a = load_checkpoint(straight / "checkpoint_latest.pt")
    b = load_checkpoint(crashed / "checkpoint_latest.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"{key} differs after resume"
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert len(result.history) == 2


def test_checkpoints_are_weights_only_and_record_the_run(phantom_root, tmp_path):
    out = tmp_path / "run"
    result = fit(tiny_config(phantom_root, tmp_path, **{"optim.epochs": 1}),
                 callbacks=[CheckpointSaver(out), RunSummary(out)])
    state = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "history"}
    assert Config.from_dict(state["config"]).model.widths == (8, 16, 32, 64)
    assert (out / "summary.json").is_file() and (out / "progress.png").stat().st_size > 1000
    metrics = result.history[0]
    for key in ("loss", "loss_seg", "loss_con", "loss_rec", "val_dice_patch", "val_dice", "lr"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val_dice"] <= 1.0


def test_zero_lambdas_train_the_plain_unet_through_the_same_loop(phantom_root, tmp_path):
    cfg = tiny_config(phantom_root, tmp_path, **{"optim.epochs": 1, "loss.lambda_con": 0, "loss.lambda_rec": 0})
    metrics = fit(cfg).history[0]
    assert metrics["loss_con"] == 0.0 and metrics["loss_rec"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["loss_seg"])
