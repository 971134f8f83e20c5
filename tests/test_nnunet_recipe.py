"""nnU-Net's training recipe on our network (``recipes.NNUNET_TRAINING``): SGD with Nesterov momentum and
deep supervision at 1/2 and 1/4 with nnU-Net's weights; the inference net and export are unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from dualssl.config import Config, ConfigError
from dualssl.engine.fit import Trainer
from dualssl.losses.composite import DualSSLLoss
from dualssl.models import SegmentationNet, build_model
from dualssl.recipes import ARMS, NNUNET_TRAINING, arm_differences, recipe_config

from tests.test_engine import tiny_config


def test_deep_supervision_heads_give_half_and_quarter_logits_and_stay_out_of_the_inference_net():
    cfg = recipe_config("smoke", "plain-sgd-ds")
    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    x = torch.rand(2, 1, 32, 32, 16)
    out = net(x, deep_supervision=True)
    assert tuple(out["logits"].shape) == (2, 2, 32, 32, 16)
    assert tuple(out["logits_half"].shape) == (2, 2, 16, 16, 8)
    assert tuple(out["logits_quarter"].shape) == (2, 2, 8, 8, 4)
    assert set(net(x)) == {"logits"}  # not asked for, not run

    seg = SegmentationNet(net)
    assert not any(k.startswith("ds_heads") for k in seg.state_dict())
    # the exported weights load into a net built without deep supervision and predict the same
    plain = SegmentationNet(build_model(recipe_config("smoke").model)).eval()
    plain.load_state_dict(seg.state_dict())
    assert torch.equal(plain(x), seg(x)) and torch.equal(seg(x), out["logits"])

    with pytest.raises(ValueError, match="model.deep_supervision"):
        build_model(recipe_config("smoke").model)(x, deep_supervision=True)


def _perfect(label: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, 2, ...)`` that put the class of ``label (B, 1, ...)`` at probability ~1."""
    fg = label.float() * 40 - 20
    return torch.cat([-fg, fg], dim=1)


def test_deep_supervision_loss_weighs_levels_one_half_quarter_against_nearest_downsampled_labels():
    cfg = recipe_config("smoke", "plain-sgd-ds")
    loss = DualSSLLoss(cfg.loss, cfg.data.spacing)
    # a pancreas made of whole 4x4x4 blocks: nearest downsampling to 1/2 and 1/4 is unambiguous
    label = torch.zeros(2, 1, 16, 16, 8, dtype=torch.long)
    label[:, :, 4:12, 4:8, 0:4] = 1
    half, quarter = label[:, :, ::2, ::2, ::2], label[:, :, ::4, ::4, ::4]
    wrong = torch.zeros(2, 2, 16, 16, 8)  # 50/50 everywhere
    full_loss = loss({"logits": wrong}, label)["seg"]
    assert float(full_loss) > 0.5

    # only the full-resolution level is wrong: seg = 1 / 1.75 of its loss
    parts = loss({"logits": wrong, "logits_half": _perfect(half), "logits_quarter": _perfect(quarter)}, label)
    assert float(parts["seg"]) == pytest.approx(float(full_loss) / 1.75, rel=1e-3)
    assert float(parts["loss"]) == pytest.approx(float(parts["seg"]))
    # only the quarter level is wrong (50/50): its weight is 0.25 / 1.75
    wrong_quarter = torch.zeros(2, 2, 4, 4, 2)
    quarter_loss = loss({"logits": wrong_quarter}, quarter)["seg"]
    parts = loss({"logits": _perfect(label), "logits_half": _perfect(half), "logits_quarter": wrong_quarter}, label)
    assert float(parts["seg"]) == pytest.approx(0.25 / 1.75 * float(quarter_loss), rel=1e-3)
    # a label shifted by one voxel at 1/2 is wrong there: the downsampled target is the block-aligned one
    shifted = torch.roll(half, shifts=1, dims=2)
    parts = loss({"logits": _perfect(label), "logits_half": _perfect(shifted), "logits_quarter": _perfect(quarter)},
                 label)
    assert float(parts["seg"]) > 0.01

    with pytest.raises(ValueError, match="logits_quarter"):
        loss({"logits": wrong, "logits_half": _perfect(half)}, label)


def test_sgd_is_nesterov_with_the_configured_momentum_and_bad_names_are_refused():
    cfg = Config().with_overrides({**NNUNET_TRAINING, "model.widths": "8,16,32,64"})
    trainer = Trainer(cfg)
    optimizer, scheduler = trainer.configure_optimizers(build_model(cfg.model))
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.99 and group["lr"] == 1e-2 and group["weight_decay"] == 3e-5
    adam_cfg = Config().with_overrides({"model.widths": "8,16,32,64"})
    assert isinstance(Trainer(adam_cfg).configure_optimizers(build_model(adam_cfg.model))[0], torch.optim.Adam)
    with pytest.raises(ConfigError, match="optim.optimizer"):
        Config().with_overrides({"optim.optimizer": "rmsprop"}).validate()
    with pytest.raises(ConfigError, match="optim.momentum"):
        Config().with_overrides({"optim.momentum": 1.0}).validate()


def test_the_sgd_ds_arms_differ_from_their_arm_by_the_recipe_alone():
    base = recipe_config("demo")
    diffs = arm_differences(base, ARMS)
    changed = {k for k in NNUNET_TRAINING if base.flat()[k] != NNUNET_TRAINING[k]}
    assert set(diffs["plain-sgd-ds"]) == changed
    assert set(diffs["dual-sgd-ds"]) == changed | set(diffs["dual"])


def test_a_dual_run_with_the_recipe_trains_every_head_and_decays_the_lr(phantom_root, tmp_path):
    cfg = tiny_config(phantom_root, tmp_path, **NNUNET_TRAINING, **{"loss.lambda_con": 0.1, "loss.lambda_rec": 0.1})
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.net.state_dict().items() if k.startswith("ds_heads")}
    history = trainer.run().history
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["loss_seg"]) for h in history)
    assert history[0]["lr"] > history[-1]["lr"]
    after = trainer.net.state_dict()
    assert before and all(not torch.equal(before[k], after[k]) for k in before), "a deep-supervision head did not train"
