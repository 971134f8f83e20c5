"""The total loss: Dice+CE + lambda_con * structure contrastive + lambda_rec * band restoration.

A branch whose lambda is 0 is off entirely: no sampling, no corruption, no second forward and no
head compute; its part is an exact zero. With both lambdas at 0 this is the plain U-Net baseline
through the same code path.

Per-step protocol (no label shortcut): the band that restoration corrupts is drawn from the
ground-truth label, so a corrupted input tells a network where the boundary is. Segmentation and
contrastive losses are therefore computed on a forward of the CLEAN patch only; the corrupted
image (a crop around the band, ``loss.rec_crop``, see ``dualssl.losses.restoration``) goes through a
second forward whose only loss is restoration. Nothing the segmentation head is trained on ever
carries the corruption's placement.

``backend="device"`` (the default) keeps the whole loss on the batch's device with fixed shapes and
no host round trip: contrastive sampling by ``sample_cells``, corruption by ``select_voxels`` and
``corrupt_batch``. ``backend="reference"`` runs the original host-side code (NumPy sampling, voxel
lists by ``nonzero``), e.g. to compare (``benchmarks/step_cost.py --backends``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualssl.config import LossConfig
from dualssl.losses.contrastive import BACKENDS, Backend, StructureContrastiveLoss
from dualssl.losses.restoration import Corrupted, corrupt_region, restoration_loss
from dualssl.losses.segmentation import segmentation_loss
from dualssl.losses.uncertainty import band_radius


class DualSSLLoss(nn.Module):
    """``DualSSLLoss(loss_cfg, spacing, backend="device")``; ``spacing`` is the data's voxel size in mm ``(X, Y, Z)``.

    Per step::

        outputs = model(image, embeddings=cfg.contrastive_on)            # CLEAN patch: logits (+ embeddings)
        corrupted = loss.corrupt(image, label)                           # None if lambda_rec == 0
        rec_outputs = model(corrupted.image, restoration=True) if corrupted else None
        parts = loss(outputs, label, rec_outputs, corrupted)             # dict(loss, seg, con, rec)
        parts["loss"].backward()

    ``seg`` and ``con`` read ``outputs`` only; ``rec`` reads ``rec_outputs["restored"]`` only (its
    logits are never scored). Shapes: image ``(B, C, X, Y, Z)`` in [0, 1]; label ``(B, 1, X, Y, Z)``
    in {0, 1}; outputs as returned by ``DualSSLNet``; every part is a float32 scalar tensor.
    ``last_counts`` holds the contrastive ``(positives, negatives)`` of the latest call.
    """

    def __init__(self, loss_cfg: LossConfig, spacing: Sequence[float], backend: Backend = "device") -> None:
        super().__init__()
        loss_cfg.validate()
        band_radius(spacing, loss_cfg.band_mm)  # checks spacing
        if backend not in BACKENDS:
            raise ValueError(f"backend: choose one of {', '.join(BACKENDS)}, got {backend!r}")
        self.cfg = loss_cfg
        self.spacing = tuple(float(s) for s in spacing)
        self.backend = backend
        self.seg = segmentation_loss()
        self.contrastive = StructureContrastiveLoss(
            loss_cfg.tau, ring_kernel=tuple(loss_cfg.ring_kernel),  # type: ignore[arg-type]
            min_pos_voxels=loss_cfg.min_pos_voxels, min_neg_voxels=loss_cfg.min_neg_voxels, backend=backend)

    @property
    def last_counts(self) -> tuple[int, int] | tuple[torch.Tensor, torch.Tensor]:
        """Contrastive ``(num_pos, num_neg)`` samples of the latest call ((0, 0) when the branch is off);
        scalar device tensors with the device backend (reading them is a host sync)."""
        return self.contrastive.last_counts if self.cfg.contrastive_on else (0, 0)

    @torch.no_grad()
    def corrupt(self, image: torch.Tensor, label: torch.Tensor, *,
                probs: torch.Tensor | None = None) -> Corrupted | None:
        """The restoration forward's input: a :class:`Corrupted` crop (``loss.rec_crop``) of ``image``
        with ``loss.corruption_ratio`` of its band voxels changed; ``None`` when ``loss.lambda_rec == 0``.

        ``image`` ``(B, C, X, Y, Z)`` is not modified. With ``loss.entropy_widen`` the caller passes
        ``probs`` ``(B, K, X, Y, Z)``, softmax probabilities of a prediction of this batch (e.g. the
        detached logits of the clean forward); high-entropy voxels then join the band.
        """
        if not self.cfg.restoration_on:
            return None
        if self.cfg.entropy_widen and probs is None:
            raise ValueError("loss.entropy_widen is on but corrupt() got no probs: pass probs=softmax of a "
                             "prediction of this batch, or set loss.entropy_widen=false")
        return corrupt_region(image, label, self.spacing, ratio=self.cfg.corruption_ratio,
                              band_mm=self.cfg.band_mm, crop=self.cfg.rec_crop,
                              probs=probs if self.cfg.entropy_widen else None,
                              entropy_threshold=self.cfg.entropy_threshold, backend=self.backend)

    def segmentation(self, outputs: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Dice+CE of ``logits``; with deep supervision (``logits_half`` and ``logits_quarter`` present)
        nnU-Net's weighting: ``(L_1 + L_1/2 / 2 + L_1/4 / 4) / 1.75``, each against the label resized
        (nearest) to that output's grid."""
        levels = [(outputs["logits"], 1.0)]
        if "logits_half" in outputs or "logits_quarter" in outputs:
            if not ("logits_half" in outputs and "logits_quarter" in outputs):
                raise ValueError("deep supervision needs both 'logits_half' and 'logits_quarter' in outputs")
            levels += [(outputs["logits_half"], 0.5), (outputs["logits_quarter"], 0.25)]
        total = sum(w for _, w in levels)
        seg = torch.zeros((), device=label.device)
        for logits, weight in levels:
            target = label if logits.shape[2:] == label.shape[2:] else \
                F.interpolate(label.float(), size=logits.shape[2:], mode="nearest-exact").to(label.dtype)
            seg = seg + (weight / total) * self.seg(logits.float(), target)
        return seg

    def forward(self, outputs: dict[str, torch.Tensor], label: torch.Tensor,
                rec_outputs: dict[str, torch.Tensor] | None = None,
                corrupted: Corrupted | None = None) -> dict[str, torch.Tensor]:
        """``dict(loss, seg, con, rec)``: the total and its unweighted parts (``seg`` over the deep-
        supervision levels when ``outputs`` has them, :meth:`segmentation`).

        ``outputs``: the forward of the clean patch (``logits``, plus ``embeddings`` when the
        contrastive branch is on); ``rec_outputs``: the forward of ``corrupted.image`` with
        ``restoration=True`` (only its ``restored`` is used).
        """
        if "logits" not in outputs:
            raise ValueError("outputs has no 'logits': pass the dict returned by DualSSLNet.forward")
        logits = outputs["logits"]
        if label.dim() != 5 or label.shape[1] != 1 or label.shape[0] != logits.shape[0] \
                or label.shape[2:] != logits.shape[2:]:
            raise ValueError(f"label must be (B, 1, X, Y, Z) matching logits {list(logits.shape)}, "
                             f"got {list(label.shape)}")
        zero = torch.zeros((), device=logits.device)
        seg = self.segmentation(outputs, label)
        total, con, rec = seg, zero, zero
        if self.cfg.contrastive_on:
            if "embeddings" not in outputs:
                raise ValueError("loss.lambda_con > 0 but outputs has no 'embeddings': call "
                                 "model(x, embeddings=loss_cfg.contrastive_on, ...)")
            con = self.contrastive(outputs["embeddings"], label)
            total = total + self.cfg.lambda_con * con
        if self.cfg.restoration_on:
            if rec_outputs is None or "restored" not in rec_outputs or corrupted is None:
                raise ValueError("loss.lambda_rec > 0 needs corrupted = loss.corrupt(image, label) and "
                                 "rec_outputs = model(corrupted.image, restoration=True)")
            rec = restoration_loss(rec_outputs["restored"], corrupted.clean, corrupted.mask, self.cfg.rec_loss)
            total = total + self.cfg.lambda_rec * rec
        return {"loss": total, "seg": seg, "con": con, "rec": rec}
