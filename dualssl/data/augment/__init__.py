"""Domain-generalisation augmentations of training patches, chosen by ``data.domain_aug``.

Each is a MONAI-style random dictionary transform (``set_random_state`` reseeds it) applied after
the standard augmentation, on patches ``image`` ``(1, X, Y, Z)`` float32 in [0, 1] and ``label``
``(1, X, Y, Z)`` in {0, 1}:

* ``bigaug`` (:class:`BigAugd`, Zhang et al. TMI 2020): stacked quality, appearance, resolution and
  spatial transformations (spatial ones move the label too);
* ``randconv`` (:class:`RandConvd`, Xu et al. ICLR 2021): a random convolution, image only;
* ``gin`` (:class:`GINd`, Ouyang et al. TMI 2023): a random shallow conv net, two draws blended by a
  smooth pseudo-correlation map (GIN-IPA), image only.
"""

from __future__ import annotations

from typing import Callable

from monai.transforms import Randomizable

from dualssl.data.augment.bigaug import BIGAUG_PROBS, BigAugd
from dualssl.data.augment.gin import GINd
from dualssl.data.augment.randconv import RandConvd

STRATEGIES: dict[str, Callable[[], Randomizable]] = {
    "bigaug": lambda: BigAugd("image", "label"),
    "randconv": lambda: RandConvd("image"),
    "gin": lambda: GINd("image"),
}
"""``data.domain_aug`` name -> factory of its transform ('none' has none)."""


def domain_augmentation(name: str) -> Randomizable | None:
    """The transform of ``data.domain_aug`` ``name``, or None for ``'none'``."""
    if name == "none":
        return None
    if name not in STRATEGIES:
        raise ValueError(f"data.domain_aug={name!r}: choose none, {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["BIGAUG_PROBS", "BigAugd", "GINd", "RandConvd", "STRATEGIES", "domain_augmentation"]
