"""Structure-guided contrastive loss: skeleton positives vs peri-pancreatic ring negatives, supervised NT-Xent.

The sampling (``dualssl.losses.sampling``) and the formula (``SupervisedNTXentLoss``) are separate so
that each can be tested alone. With ``backend="device"`` (the default) sampling, gathering and the
loss are torch ops on the embeddings' device with fixed shapes: no host round trip in the step.
``backend="reference"`` samples with the NumPy reference on the host (the original code).
"""

from __future__ import annotations

import typing
from typing import Literal

import numpy as np
import torch
from torch import nn

from dualssl.losses.sampling import DOWNSAMPLE, CellSamples, StructureSamples, sample_batch, sample_cells

Backend = Literal["device", "reference"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)


class SupervisedNTXentLoss(nn.Module):
    """Label-supervised NT-Xent (SupCon, Khosla et al. 2020, "L_out" form) with temperature ``tau``.

    For unit vectors ``z_i`` with labels ``y_i`` and ``s_ij = z_i . z_j / tau``::

        L_i = -1/|P(i)| * sum_{p in P(i)} [ s_ip - log sum_{a != i} exp(s_ia) ]
        L   = mean of L_i over the anchors with |P(i)| >= 1

    where ``P(i) = {p != i : y_p = y_i}``. With no anchor that has a positive (fewer than two
    samples of every label) the loss is an exact zero that still depends on ``features``, so
    ``backward()`` works and gives zero gradients. No host sync: that case is a masked mean.

    Args (forward):
        features: ``(N, E)`` float, L2-normalised along E (cosine similarity = dot product).
        labels: ``(N,)`` integer or bool class of each sample.
        valid: optional ``(N,)`` bool; samples marked False take no part at all (as if absent).
    Returns:
        scalar tensor (float32).
    """

    def __init__(self, tau: float) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"loss.tau: the temperature must be > 0, got {tau}")
        self.tau = float(tau)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"features must be (N, E), got shape {list(features.shape)}")
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {features.shape[0]} (features' first size), "
                             f"got shape {list(labels.shape)}")
        feats = features.float()
        n = feats.shape[0]
        if n < 2:
            return feats.sum() * 0.0
        labels = labels.to(feats.device)
        eye = torch.eye(n, dtype=torch.bool, device=feats.device)
        pair = ~eye if valid is None else (valid[:, None] & valid[None, :] & ~eye)
        positive = (labels[:, None] == labels[None, :]) & pair
        num_pos = positive.sum(dim=1)
        anchors = num_pos > 0
        logits = feats @ feats.T / self.tau
        # rows without any pair (invalid samples) get 0s, not -inf: finite values and gradients
        others = torch.where(pair.any(dim=1, keepdim=True), logits.masked_fill(~pair, float("-inf")), 0.0)
        log_prob = logits - torch.logsumexp(others, dim=1, keepdim=True)
        mean_log_prob_pos = torch.where(positive, log_prob, 0.0).sum(dim=1) / num_pos.clamp_min(1)
        return -(mean_log_prob_pos * anchors).sum() / anchors.sum().clamp_min(1)


def gather_cells(embeddings: torch.Tensor, samples: StructureSamples | CellSamples) -> torch.Tensor:
    """Embeddings of the sampled cells: ``(B, E, x, y, z)`` -> ``(N, E)`` (every slot of ``CellSamples``)."""
    idx = torch.as_tensor(samples.index, device=embeddings.device)
    return embeddings[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]]


class StructureContrastiveLoss(nn.Module):
    """Supervised NT-Xent between pancreas-skeleton cells (positives) and peri-pancreatic ring cells (negatives).

    Args:
        backend: ``"device"`` (default): ``sample_cells`` on the embeddings' device, no host sync;
            ``"reference"``: the NumPy reference ``sample_batch`` on the host.
        skeleton_rounds: thinning rounds of the device skeletons (``thin``; None = enough for the grid).
    Args (forward):
        embeddings: ``(B, E, X/8, Y/8, Z/8)`` L2-normalised over E (the projection head's output).
        label: ``(B, 1, X, Y, Z)`` in {0, 1} at full resolution, X, Y, Z multiples of 8.
        rng: reference backend only: NumPy generator for the sampling; by default one seeded from
            torch's global RNG, so runs seeded through torch are reproducible.
        generator: device backend only: torch generator of the embeddings' device (default: the global one).
    Returns:
        scalar tensor; an exact zero with a zero-gradient path when the batch has no positive or no
        negative cell. ``last_counts`` holds ``(num_pos, num_neg)`` of the latest call: ints with the
        reference backend, scalar tensors on the device with the device backend (reading them syncs).
    """

    def __init__(self, tau: float, ring_kernel: tuple[int, int] = (10, 20), min_pos_voxels: int = 10,
                 min_neg_voxels: int = 5, backend: Backend = "device", skeleton_rounds: int | None = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: choose one of {', '.join(BACKENDS)}, got {backend!r}")
        self.ntxent = SupervisedNTXentLoss(tau)
        self.ring_kernel = (int(ring_kernel[0]), int(ring_kernel[1]))
        self.min_pos_voxels = int(min_pos_voxels)
        self.min_neg_voxels = int(min_neg_voxels)
        self.backend = backend
        self.skeleton_rounds = skeleton_rounds
        self.last_counts: tuple[int, int] | tuple[torch.Tensor, torch.Tensor] = (0, 0)

    def forward(self, embeddings: torch.Tensor, label: torch.Tensor, rng: np.random.Generator | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if embeddings.dim() != 5:
            raise ValueError(f"embeddings must be (B, E, x, y, z), got shape {list(embeddings.shape)}")
        if label.dim() != 5 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, X, Y, Z), got shape {list(label.shape)}")
        expected = [label.shape[0], *(s // DOWNSAMPLE for s in label.shape[2:])]
        got = [embeddings.shape[0], *embeddings.shape[2:]]
        if got != expected or any(s % DOWNSAMPLE for s in label.shape[2:]):
            raise ValueError(f"embeddings (B, E, x, y, z) = {list(embeddings.shape)} do not sit at 1/{DOWNSAMPLE} "
                             f"of label {list(label.shape)}: expected B, x, y, z = {expected}")
        if self.backend == "reference":
            return self._forward_reference(embeddings, label, rng)
        if rng is not None:
            raise ValueError("rng (a NumPy generator) drives the reference backend; pass generator= "
                             "(a torch.Generator) to the device backend")
        samples = sample_cells(label, ring_kernel=self.ring_kernel, min_pos_voxels=self.min_pos_voxels,
                               min_neg_voxels=self.min_neg_voxels, generator=generator,
                               rounds=self.skeleton_rounds)
        num_pos, num_neg = samples.num_pos, samples.num_neg
        self.last_counts = (num_pos, num_neg)
        value = self.ntxent(gather_cells(embeddings, samples), samples.is_pancreas, valid=samples.valid)
        return torch.where((num_pos > 0) & (num_neg > 0), value, embeddings.float().sum() * 0.0)

    def _forward_reference(self, embeddings: torch.Tensor, label: torch.Tensor,
                           rng: np.random.Generator | None) -> torch.Tensor:
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        samples = sample_batch(label, ring_kernel=self.ring_kernel, min_pos_voxels=self.min_pos_voxels,
                               min_neg_voxels=self.min_neg_voxels, rng=rng)
        self.last_counts = (samples.num_pos, samples.num_neg)
        if samples.num_pos == 0 or samples.num_neg == 0:
            return embeddings.float().sum() * 0.0
        labels = torch.as_tensor(samples.is_pancreas, device=embeddings.device)
        return self.ntxent(gather_cells(embeddings, samples), labels)
