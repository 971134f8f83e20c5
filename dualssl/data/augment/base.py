"""What the image-only DG augmentations share: plain tensors, per-channel [0, 1] rescaling, and the
MONAI dict-transform plumbing (draw once per call, apply to every key, keep the input's type)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type


def plain(img: Any) -> torch.Tensor:
    """``img`` as a plain float32 tensor (no MetaTensor bookkeeping inside the random ops)."""
    x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    return x.to(torch.float32)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Rescale each channel of ``x`` ``(C, X, Y, Z)`` to [0, 1]; a constant channel becomes 0."""
    flat = x.reshape(x.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - lo.view(shape)) / span.view(shape)).clamp_(0.0, 1.0)


class RandImageAugmentd(RandomizableTransform, MapTransform):
    """Base of image-only random dict transforms: subclasses draw their parameters in ``randomize`` and
    map one image ``(C, X, Y, Z)`` float32 in [0, 1] to another in ``augment``; labels are never touched."""

    def __init__(self, keys: Any, prob: float, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        d = dict(data)
        if randomize:
            self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            with torch.no_grad():
                out = self.augment(plain(img)).clamp_(0.0, 1.0)
            d[key] = convert_to_dst_type(out, dst=img, dtype=torch.float32)[0]
        return d
