"""Supervised segmentation loss: MONAI's Dice + cross-entropy on softmax logits."""

from __future__ import annotations

from monai.losses import DiceCELoss


def segmentation_loss() -> DiceCELoss:
    """Dice + CE for logits ``(B, K, X, Y, Z)`` against a label map ``(B, 1, X, Y, Z)`` of class indices.

    * ``include_background=False``: the Dice term scores the foreground classes only. With two
      classes the background Dice is ~1 whatever the network does and would dilute the pancreas
      term; the CE term still covers every class (MONAI's CE ignores this flag).
    * ``batch=True``: Dice sums over the batch before dividing (the follow-up's batch Dice), so a
      patch without pancreas (negative-centred samples) neither explodes nor vanishes.
    """
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
