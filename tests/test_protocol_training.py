"""The training protocol on the real engine, net and phantom: no label shortcut (segmentation and
contrastive losses see the clean patch, the corrupted crop feeds restoration only), non-finite steps
skipped and counted then stopping the run, no stale or fake validation numbers.

Instrumented through Trainer/loss subclasses and forward hooks on the real modules (no mocks).
"""

from __future__ import annotations

import math

import pytest
import torch

from dualssl.config import Config, ConfigError
from dualssl.engine import Trainer, fit
from dualssl.losses import DualSSLLoss
from dualssl.recipes import TINY


def tiny_config(root, tmp_path, **overrides) -> Config:
    cfg = Config().with_overrides({**TINY, "optim.lr": 3e-3, "optim.epochs": 1, "optim.steps_per_epoch": 2,
                                   "loss.min_pos_voxels": 1, "loss.min_neg_voxels": 1, **overrides})
    cfg.data.root = str(root)
    cfg.data.source_sites = ["pv_standard"]
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg.validate()


class RecordingLoss(DualSSLLoss):
    """Keeps what ``corrupt`` returned last."""

    def corrupt(self, image, label, *, probs=None):
        self.last_corrupted = super().corrupt(image, label, probs=probs)
        return self.last_corrupted


class Recording(Trainer):
    """Records, per step, the batch image, every forward of the net, and what the seg / contrastive losses got."""

    progress = False

    def build_loss(self):
        return RecordingLoss(self.cfg.loss, spacing=self.cfg.data.spacing)

    def setup(self):
        super().setup()
        self.steps: list[dict] = []
        self.net.register_forward_hook(self._on_forward, with_kwargs=True)
        self.criterion.seg.register_forward_pre_hook(lambda m, args: self.steps[-1]["seg_in"].append(args[0]))
        self.criterion.contrastive.register_forward_pre_hook(
            lambda m, args: self.steps[-1]["con_in"].append(args[0]))

    def _on_forward(self, module, args, kwargs, output):
        if module.training:
            self.steps[-1]["forwards"].append((args[0], dict(kwargs), output))

    def train_step(self, batch):
        self.steps.append({"image": batch["image"].clone(), "forwards": [], "seg_in": [], "con_in": []})
        out = super().train_step(batch)
        self.steps[-1]["corrupted"] = getattr(self.criterion, "last_corrupted", None)
        return out


def test_segmentation_and_contrastive_losses_see_the_clean_patch(phantom_root, tmp_path):
    trainer = Recording(tiny_config(phantom_root, tmp_path))
    trainer.setup()
    trainer.train_epoch(0)
    assert len(trainer.steps) == 2
    for step in trainer.steps:
        (clean_x, clean_kw, clean_out), (rec_x, rec_kw, rec_out) = step["forwards"]  # exactly two forwards
        assert torch.equal(clean_x, step["image"])  # bit for bit the training patch
        assert clean_kw.get("restoration", False) is False and clean_kw["embeddings"] is True
        assert rec_kw["restoration"] is True and not rec_kw.get("embeddings", False)
        # the segmentation loss ran once, on the clean forward's logits; contrastive on its embeddings
        assert len(step["seg_in"]) == 1 and step["seg_in"][0] is clean_out["logits"]
        assert len(step["con_in"]) == 1 and step["con_in"][0] is clean_out["embeddings"]
        # the restoration forward's input is the corrupted crop, differing from the clean crop
        corrupted = step["corrupted"]
        assert rec_x is corrupted.image and corrupted.mask.any()
        assert not torch.equal(rec_x, corrupted.clean)
        x, y, z = corrupted.origin[0].tolist()
        sx, sy, sz = rec_x.shape[2:]
        assert torch.equal(corrupted.clean[0], step["image"][0, :, x:x + sx, y:y + sy, z:z + sz])
        assert tuple(rec_x.shape[2:]) == (16, 16, 8)  # loss.rec_crop 0.5 of the 32x32x16 patch


def test_plain_arm_runs_one_forward(phantom_root, tmp_path):
    trainer = Recording(tiny_config(phantom_root, tmp_path, **{"loss.lambda_con": 0, "loss.lambda_rec": 0,
                                                               "optim.steps_per_epoch": 1}))
    trainer.setup()
    metrics = trainer.train_epoch(0)
    assert [len(s["forwards"]) for s in trainer.steps] == [1]
    assert metrics["con_pos"] == metrics["con_neg"] == metrics["rec_ratio"] == 0.0


class NaNInput(Recording):
    """Puts a NaN into the input of the steps listed in ``bad`` (pairs epoch, step) and snapshots the
    weights and Adam state around each step."""

    bad: set[tuple[int, int]] = {(0, 1)}

    def train_epoch(self, epoch):
        self.current_epoch, self.step_in_epoch = epoch, 0
        return super().train_epoch(epoch)

    def train_step(self, batch):
        if (self.current_epoch, self.step_in_epoch) in self.bad:
            batch = {**batch, "image": batch["image"].clone()}
            batch["image"][0, 0, 3, 3, 3] = math.nan
        before = _snapshot(self)
        out = super().train_step(batch)
        self.steps[-1]["unchanged"] = _same(before, _snapshot(self))
        self.step_in_epoch += 1
        return out


def _snapshot(trainer: Trainer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in trainer.net.parameters()]
    for state in trainer.optimizer.state.values():
        tensors += [v.clone() for v in state.values() if torch.is_tensor(v)]
    return tensors


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_nonfinite_step_changes_no_weight_and_is_counted(phantom_root, tmp_path):
    trainer = NaNInput(tiny_config(phantom_root, tmp_path, **{"optim.steps_per_epoch": 3}))
    trainer.setup()
    metrics = trainer.train_epoch(0)
    assert [s["unchanged"] for s in trainer.steps] == [False, True, False]
    assert metrics["nonfinite_steps"] == 1.0 and metrics["steps"] == 3.0
    for key in ("loss", "loss_seg", "loss_con", "loss_rec"):  # means over the two steps taken
        assert math.isfinite(metrics[key]), key
    assert "loss_seg=nan" in trainer.last_nonfinite


def test_consecutive_nonfinite_steps_stop_the_run_naming_epoch_and_part(phantom_root, tmp_path):
    class AlwaysNaNFromEpoch1(NaNInput):
        bad = {(1, s) for s in range(3)}

    cfg = tiny_config(phantom_root, tmp_path, **{"optim.epochs": 2, "optim.steps_per_epoch": 3,
                                                 "optim.max_nonfinite_steps": 2, "eval.val_every": 5})
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1: 2 training steps in a row") as info:
        fit(cfg, trainer_cls=AlwaysNaNFromEpoch1)
    assert "loss_seg=nan" in str(info.value) and "optim.max_nonfinite_steps" in str(info.value)
    with pytest.raises(ConfigError, match="optim.max_nonfinite_steps"):
        Config().with_overrides({"optim.max_nonfinite_steps": 0}).validate()


def test_unmeasured_epochs_report_nan_never_a_stale_value(phantom_root, tmp_path):
    cfg = tiny_config(phantom_root, tmp_path, **{"optim.epochs": 4, "optim.steps_per_epoch": 1,
                                                 "eval.val_every": 2, "loss.lambda_con": 0, "loss.lambda_rec": 0})
    result = fit(cfg, trainer_cls=Recording)
    assert [h["val_measured"] for h in result.history] == [0.0, 1.0, 0.0, 1.0]
    for h in result.history:
        assert math.isnan(h["val_dice"]) == (h["val_measured"] == 0.0), h  # old code: epoch 2 = epoch 1's
    assert result.best_epoch in (1, 3)
    assert result.best_metric == max(result.history[e]["val_dice"] for e in (1, 3))


def test_patch_dice_without_any_foreground_is_nan_not_one(phantom_root, tmp_path):
    trainer = Recording(tiny_config(phantom_root, tmp_path))
    trainer.setup()
    with torch.no_grad():  # a net that predicts background everywhere
        trainer.net.seg_head.conv.weight.zero_()
        trainer.net.seg_head.conv.bias.copy_(torch.tensor([10.0, -10.0]))
    empty = {"image": torch.rand(1, 1, 32, 32, 16), "label": torch.zeros(1, 1, 32, 32, 16)}
    trainer.data.val_patch_loader = [empty]
    assert math.isnan(trainer.validate_patches())  # old code: 1.0
    hit = {"image": empty["image"], "label": torch.zeros(1, 1, 32, 32, 16)}
    hit["label"][..., :2, :2, :2] = 1  # 8 foreground voxels, none predicted: Dice 0
    trainer.data.val_patch_loader = [hit]
    assert trainer.validate_patches() == 0.0
