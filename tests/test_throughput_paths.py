"""Fast paths of whole-volume inference give the very answers of the plain ones."""

from __future__ import annotations

import pytest
import torch

from dualssl.config import Config
from dualssl.evaluation.inference import Predictor, argmax_channels


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
