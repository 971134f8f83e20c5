"""Fast paths of whole-volume inference give the very answers of the plain ones; the trial side of a
study starts without importing MONAI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualssl.config import Config
from dualssl.evaluation.inference import Predictor, argmax_channels

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_argmax_channels_equals_torch_argmax_ties_included(k):
    g = torch.Generator().manual_seed(k)
    # few distinct values: many ties between channels, where the first maximal channel must win
    probs = torch.randint(0, 3, (k, 9, 7, 5), generator=g).float()
    probs[:, 0, 0, 0] = 1.0  # an all-tie voxel
    labels = argmax_channels(probs)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 9, 7, 5)
    assert torch.equal(labels, torch.argmax(probs, dim=0, keepdim=True).to(torch.uint8))
    assert int(labels[0, 0, 0, 0]) == 0


def test_argmax_channels_leaves_its_input_alone():
    probs = torch.softmax(torch.randn(3, 6, 6, 4, generator=torch.Generator().manual_seed(0)), dim=0)
    before = probs.clone()
    argmax_channels(probs)
    assert torch.equal(probs, before)


def test_argmax_channels_rejects_a_batched_tensor():
    with pytest.raises(ValueError, match=r"\(K,X,Y,Z\)"):
        argmax_channels(torch.zeros(1, 2, 4, 4, 4))


def test_labels_from_probs_are_the_argmax_of_softmax_probabilities():
    cfg = Config()
    cfg.eval.keep_largest = False
    predictor = Predictor(torch.nn.Identity(), cfg, device="cpu")
    probs = torch.softmax(torch.randn(2, 12, 10, 8, generator=torch.Generator().manual_seed(1)), dim=0)
    assert torch.equal(predictor.labels_from_probs(probs),
                       torch.argmax(probs, dim=0, keepdim=True).to(torch.uint8))


def test_pad_single_batch_doubles_only_a_single_cpu_sample():
    from dualssl.evaluation.inference import pad_single_batch

    one = torch.randn(1, 1, 4, 4, 4)
    padded = pad_single_batch(one)
    assert padded.shape == (2, 1, 4, 4, 4) and torch.equal(padded[0], one[0]) and torch.equal(padded[1], one[0])
    two = torch.randn(2, 1, 4, 4, 4)
    assert pad_single_batch(two) is two


def test_window_batch_size_does_not_change_the_prediction():
    """Windows slid one at a time (padded to two on the CPU) or four at a time give the same probabilities."""
    from dualssl.models import SegmentationNet
    from dualssl.models.factory import build_model
    from dualssl.recipes import recipe_config

    cfg = recipe_config("smoke")
    torch.manual_seed(0)
    net = SegmentationNet(build_model(cfg.model)).eval()
    image = torch.randn(1, 40, 36, 20, generator=torch.Generator().manual_seed(2))
    probs = {}
    for sw_batch in (1, 4):
        cfg.eval.sw_batch_size = sw_batch
        probs[sw_batch] = Predictor(net, cfg, device="cpu").predict_probs(image)
    assert torch.allclose(probs[1], probs[4], atol=1e-5)


def test_the_trial_side_of_a_study_imports_no_monai():
    """A Tune trial actor and a Train controller unpickle the study's functions, importing
    studies.trainable / studies.train_loop; MONAI's import (every submodule, ~8 s of CPU here) must
    wait for the processes that load data or measure cases."""
    code = ("import sys; import studies.trainable, studies.train_loop, studies.crosssite, dualssl.evaluation.metrics; "
            "print(sorted(m for m in sys.modules if m == 'monai' or m.startswith('monai.'))[:5])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
    # and the metrics still work where they are used
    import numpy as np

    from dualssl.evaluation import case_metrics

    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    assert case_metrics(mask, mask, (1.0, 1.0, 1.0))["dice"] == 1.0
