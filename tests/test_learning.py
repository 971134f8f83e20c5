"""Learning: a narrow dual-SSL net trained for a few CPU minutes segments its source site's pancreas."""

from __future__ import annotations

import pytest

from dualssl.config import Config
from dualssl.engine import fit
from dualssl.recipes import SCALES

LEARNING = dict(SCALES["learning"])  # also benchmarks/cross_site_small.py


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
