"""BigAug: deep stacked transformations (Zhang et al., "Generalizing deep learning for medical image
segmentation to unseen domains via deep stacked transformation", IEEE TMI 39(7), 2020).

Nine MONAI dictionary transforms in a fixed order, each applied with its own probability
(:data:`BIGAUG_PROBS`), close to nnU-Net's DA5 trainer. Image ``(1, X, Y, Z)`` float32 in [0, 1];
the spatial ones move image (bilinear) and label (nearest) together, the others touch the image
only; the result is clipped back to [0, 1].

==============  =====  ===========================================  ==========================================
name            prob   MONAI transform                              parameters
==============  =====  ===========================================  ==========================================
``affine``      0.3    ``RandAffined`` (image + label)               rotation +-20 deg, scale 0.8-1.2, zeros pad
``elastic``     0.2    ``Rand3DElasticd`` (image + label)            sigma 5-7, magnitude 150-400 (~1.4 voxels)
``sharpen``     0.2    ``RandGaussianSharpend``                      sigma1 0.5-1, sigma2 0.5, alpha 5-15
``blur``        0.2    ``RandGaussianSmoothd``                       sigma 0.5-1.5 voxels
``noise``       0.3    ``RandGaussianNoised``                        std up to 0.1 (34 HU at the default window)
``gamma``       0.3    ``RandAdjustContrastd``                       gamma 0.5-2
``brightness``  0.3    ``RandScaleIntensityd``                       x (1 +- 0.25)
``shift``       0.3    ``RandShiftIntensityd``                       +- 0.15
``lowres``      0.25   ``RandSimulateLowResolutiond``                zoom 0.5-1 (nearest down, trilinear up)
==============  =====  ===========================================  ==========================================
"""

from __future__ import annotations

import math
from typing import Mapping

from monai.transforms import (
    Compose,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    ScaleIntensityRanged,
)

BIGAUG_PROBS: dict[str, float] = {"affine": 0.3, "elastic": 0.2, "sharpen": 0.2, "blur": 0.2, "noise": 0.3,
                                  "gamma": 0.3, "brightness": 0.3, "shift": 0.3, "lowres": 0.25}
"""Probability of each stacked transformation (the table above), in the order they run."""
SPATIAL = ("affine", "elastic")
"""The transformations that move the label with the image."""


class BigAugd(Compose):
    """The BigAug stack as one random dict transform (a MONAI ``Compose``, so ``set_random_state``
    reseeds every stage). ``probs`` overrides entries of :data:`BIGAUG_PROBS` (e.g. 0 to switch a
    stage off)."""

    def __init__(self, image_key: str = "image", label_key: str = "label",
                 probs: Mapping[str, float] | None = None) -> None:
        unknown = sorted(set(probs or {}) - set(BIGAUG_PROBS))
        if unknown:
            raise ValueError(f"BigAugd probs: unknown stage(s) {unknown}; stages: {', '.join(BIGAUG_PROBS)}")
        self.probs = {**BIGAUG_PROBS, **(probs or {})}
        p, both, img = self.probs, [image_key, label_key], image_key
        stages = {
            "affine": RandAffined(both, prob=p["affine"], rotate_range=(math.radians(20),) * 3,
                                  scale_range=(0.2,) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
            "elastic": Rand3DElasticd(both, sigma_range=(5.0, 7.0), magnitude_range=(150.0, 400.0),
                                      prob=p["elastic"], mode=("bilinear", "nearest"), padding_mode="zeros"),
            "sharpen": RandGaussianSharpend(img, alpha=(5.0, 15.0), prob=p["sharpen"]),
            "blur": RandGaussianSmoothd(img, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5),
                                        prob=p["blur"]),
            "noise": RandGaussianNoised(img, prob=p["noise"], std=0.1),
            "gamma": RandAdjustContrastd(img, prob=p["gamma"], gamma=(0.5, 2.0)),
            "brightness": RandScaleIntensityd(img, factors=0.25, prob=p["brightness"]),
            "shift": RandShiftIntensityd(img, offsets=0.15, prob=p["shift"]),
            "lowres": RandSimulateLowResolutiond(img, prob=p["lowres"], zoom_range=(0.5, 1.0)),
        }
        clip = ScaleIntensityRanged(img, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
        super().__init__([*stages.values(), clip], log_stats=False)
