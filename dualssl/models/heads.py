"""Heads on the backbone: segmentation logits, contrastive projection, image restoration."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """1x1x1 conv: decoder features ``(B, C, X, Y, Z)`` -> logits ``(B, K, X, Y, Z)`` (softmax over K)."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features)


class ProjectionHead(nn.Module):
    """1x1x1 conv + ReLU on the bottleneck, then L2 normalisation over channels.

    ``(B, C, x, y, z)`` -> ``(B, E, x, y, z)`` with unit norm along E (an all-zero vector after
    the ReLU stays zero rather than dividing by zero).
    """

    def __init__(self, in_ch: int, embed_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, embed_dim, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.relu(self.conv(bottleneck)), dim=1, eps=1e-6)


class RestorationHead(nn.Module):
    """1x1x1 conv + sigmoid: decoder features ``(B, C, X, Y, Z)`` -> restored image ``(B, 1, X, Y, Z)`` in [0, 1].

    Deliberately light: the restoration task should shape the shared decoder features, not a
    private decoder of its own (and it must stay cheap next to the segmentation path).
    """

    def __init__(self, in_ch: int, out_ch: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(features))
