"""Learning: a narrow dual-SSL net trained for a few CPU minutes segments its source site's pancreas."""

from __future__ import annotations

import pytest

from dualssl.config import Config
from dualssl.engine import fit

# Narrow net, coarse voxels, no augmentation (the source site only): ~200 steps, a few minutes on 2 cores.
LEARNING = {
    "model.widths": "8,16,32,64",
    "data.spacing": "3,3,4",
    "data.patch_size": "48,48,32",
    "data.batch_size": 2,
    "data.samples_per_volume": 2,
    "data.augment": False,
    "optim.lr": 3e-3,
    "optim.epochs": 20,
    "optim.steps_per_epoch": 10,
    "eval.val_every": 5,
}


@pytest.mark.slow
def test_full_dual_ssl_model_reaches_dice_half_on_source_validation(phantom_root, tmp_path):
    cfg = Config().with_overrides(LEARNING)
    cfg.data.root = str(phantom_root)
    cfg.data.source_sites = ["pv_standard"]
    cfg.data.cache_dir = str(tmp_path / "cache")
    assert cfg.loss.contrastive_on and cfg.loss.restoration_on
    result = fit(cfg)
    first, last = result.history[0], result.history[-1]
    assert last["loss_seg"] < first["loss_seg"]
    assert result.best_metric >= 0.5, f"whole-volume validation Dice {result.best_metric:.3f} < 0.5"
