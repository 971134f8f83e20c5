"""GIN-IPA: global intensity non-linear augmentation with interventional pseudo-correlation
augmentation (Ouyang, Chen, Li, Li, Bai, Rueckert, "Causality-inspired single-source domain
generalization for medical image segmentation", IEEE TMI 42(4), 2023; arXiv 2111.12525, 2021), in 3D.

**GIN**: a random shallow conv net of ``n_layers`` (4) layers, ``channels`` (2) intermediate
channels, each layer's kernel size drawn from ``kernel_sizes`` ({1, 3}, the authors' scale pool),
weights and biases N(0, 1), leaky ReLU (slope 0.01) after every layer but the last. Its output is
rescaled to [0, 1] (min-max, in place of the authors' Frobenius-norm rescale: this pipeline works
in [0, 1]) and mixed with the input: ``g(x) = alpha * net(x) + (1 - alpha) * x``, ``alpha ~ U(0, 1)``.

**IPA**: two independent GIN draws blended by a smooth random map ``b`` in [0, 1],
``x' = b * g1(x) + (1 - b) * g2(x)``. ``b`` is a ``control_points`` lattice (default 4 per axis) of
U(0, 1) values upsampled by cubic B-spline interpolation (``scipy.ndimage.zoom``, order 3) and
clipped to [0, 1]: a smooth multiplicative field that breaks the spurious correlation between
intensity and position. ``ipa=False`` keeps one GIN draw. Image only; the label is untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from scipy import ndimage

from dualssl.data.augment.base import RandImageAugmentd, minmax

LEAKY_SLOPE = 0.01
"""Negative slope of the leaky ReLU (torch's default, as in the authors' code)."""


@functools.lru_cache(maxsize=32)
def _spline_matrix(n: int, size: int) -> torch.Tensor:
    """``(size, n)``: cubic B-spline upsampling of ``n`` control points to ``size`` samples, end
    points on end points (``ndimage.zoom(order=3, mode="nearest", grid_mode=False)`` along one axis)."""
    m = ndimage.zoom(np.eye(n, dtype=np.float64), (size / n, 1.0), order=3, mode="nearest", grid_mode=False)
    return torch.from_numpy(m[:size].astype(np.float32))


class GINd(RandImageAugmentd):
    """GIN-IPA of ``keys`` (images ``(C, X, Y, Z)`` in [0, 1]) with probability ``prob``; the output
    stays ``(C, X, Y, Z)`` float32 in [0, 1]. Every random number comes from ``self.R``."""

    def __init__(self, keys: KeysCollection = "image", prob: float = 1.0, n_layers: int = 4, channels: int = 2,
                 kernel_sizes: Sequence[int] = (1, 3), ipa: bool = True, control_points: int = 4,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        if n_layers < 2 or channels < 1 or control_points < 2:
            raise ValueError(f"GINd: n_layers={n_layers} (>= 2), channels={channels} (>= 1), "
                             f"control_points={control_points} (>= 2)")
        if not kernel_sizes or any(int(k) < 1 or int(k) % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"GINd kernel_sizes={tuple(kernel_sizes)}: give odd sizes >= 1, e.g. (1, 3)")
        self.n_layers, self.channels, self.ipa, self.control_points = n_layers, channels, ipa, control_points
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.nets: list[list[tuple[np.ndarray, np.ndarray]]] = []
        self.alphas: list[float] = []
        self.lattice = np.zeros((control_points,) * 3, np.float32)

    def _draw_net(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight ``(out, in, k, k, k)``, bias ``(out,)``) per layer, 1 -> channels -> ... -> 1."""
        sizes = [1] + [self.channels] * (self.n_layers - 1) + [1]
        net = []
        for c_in, c_out in zip(sizes[:-1], sizes[1:]):
            k = int(self.R.choice(self.kernel_sizes))
            net.append((self.R.standard_normal((c_out, c_in, k, k, k)).astype(np.float32),
                        self.R.standard_normal(c_out).astype(np.float32)))
        return net

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        n = 2 if self.ipa else 1
        self.nets = [self._draw_net() for _ in range(n)]
        self.alphas = [float(self.R.uniform()) for _ in range(n)]
        self.lattice = self.R.uniform(size=(self.control_points,) * 3).astype(np.float32)

    @staticmethod
    def run_net(net: list[tuple[np.ndarray, np.ndarray]], x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(C, X, Y, Z)`` -> the random net applied to each channel, ``(C, X, Y, Z)``."""
        h = x.unsqueeze(1)                                                      # (C, 1, X, Y, Z)
        for i, (w, b) in enumerate(net):
            k = w.shape[-1]
            h = F.conv3d(F.pad(h, (k // 2,) * 6, mode="replicate") if k > 1 else h,
                         torch.from_numpy(w), torch.from_numpy(b))
            if i < len(net) - 1:
                h = F.leaky_relu(h, LEAKY_SLOPE)
        return h.squeeze(1)

    def blend_map(self, spatial: Sequence[int]) -> torch.Tensor:
        """The IPA map ``(X, Y, Z)`` in [0, 1]: the control-point lattice, cubic B-spline upsampled.

        Spline interpolation is separable, so ``ndimage.zoom`` of the lattice equals three small
        matrix products with the 1D zoom of the identity (a fraction of the cost of a 3D zoom)."""
        b = torch.from_numpy(self.lattice)
        for axis, size in enumerate(spatial):
            m = _spline_matrix(self.control_points, int(size))                  # (size, control_points)
            b = torch.movedim(torch.tensordot(m, b, dims=([1], [axis])), 0, axis)
        return b.clamp_(0.0, 1.0)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(C, X, Y, Z)`` float32 in [0, 1] -> GIN-IPA of it, same shape, in [0, 1]."""
        views = [a * minmax(self.run_net(net, x)) + (1.0 - a) * x for net, a in zip(self.nets, self.alphas)]
        if len(views) == 1:
            return views[0]
        b = self.blend_map(x.shape[1:])
        return b * views[0] + (1.0 - b) * views[1]
