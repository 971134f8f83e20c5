"""RandConv: random convolutions at the input (Xu, Zhang, Li, Niethammer, "Robust and generalizable
visual representation learning via random convolutions", ICLR 2021), in 3D.

Per patch: a kernel size ``k`` drawn from ``kernel_sizes`` (default {1, 3, 5, 7}), a ``k x k x k``
kernel with weights N(0, 1/k^3) (the paper's He-style variance, ``1/(k^d C_in)`` with ``d = 3``,
``C_in = 1``), replicate padding, output rescaled to [0, 1] per channel (min-max), then (``mix``)
blended with the input: ``alpha * x + (1 - alpha) * conv(x)``, ``alpha ~ U(0, 1)``. A 1x1x1 kernel
with a negative weight inverts the contrast. Image only; the label is untouched.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection

from dualssl.data.augment.base import RandImageAugmentd, minmax, plain


class RandConvd(RandImageAugmentd):
    """Random 3D convolution of ``keys`` (images ``(C, X, Y, Z)`` in [0, 1]) with probability ``prob``;
    the output stays ``(C, X, Y, Z)`` float32 in [0, 1]."""

    def __init__(self, keys: KeysCollection = "image", prob: float = 1.0,
                 kernel_sizes: Sequence[int] = (1, 3, 5, 7), mix: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        if not kernel_sizes or any(int(k) < 1 or int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"RandConvd kernel_sizes={tuple(kernel_sizes)}: give odd sizes >= 1, e.g. (1, 3, 5, 7)")
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.mix = mix
        self.kernel = np.ones((1, 1, 1), np.float32)
        self.alpha = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        k = int(self.R.choice(self.kernel_sizes))
        self.kernel = self.R.normal(0.0, (1.0 / k**3) ** 0.5, size=(k, k, k)).astype(np.float32)
        self.alpha = float(self.R.uniform()) if self.mix else 0.0

    def convolve(self, img: torch.Tensor) -> torch.Tensor:
        """``img`` ``(C, X, Y, Z)`` -> the random convolution, rescaled to [0, 1] (``(C, X, Y, Z)``)."""
        x = plain(img).unsqueeze(1)                                            # (C, 1, X, Y, Z)
        k = self.kernel.shape[0]
        if k > 1:
            x = F.pad(x, (k // 2,) * 6, mode="replicate")
        y = F.conv3d(x, torch.from_numpy(self.kernel)[None, None]).squeeze(1)
        return minmax(y)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(C, X, Y, Z)`` -> ``alpha * x + (1 - alpha) * convolve(x)``."""
        return self.alpha * x + (1.0 - self.alpha) * self.convolve(x)
