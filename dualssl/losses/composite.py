"""The total loss: Dice+CE + lambda_con * structure contrastive + lambda_rec * band restoration.

A branch whose lambda is 0 is off entirely: no sampling, no corruption, and (the engine calls
``model(x, embeddings=loss_cfg.contrastive_on, restoration=loss_cfg.restoration_on)``) no head
compute; its part is an exact zero. With both lambdas at 0 this is the plain U-Net baseline
through the same code path.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dualssl.config import LossConfig
from dualssl.losses.contrastive import StructureContrastiveLoss
from dualssl.losses.restoration import corrupt_region, restoration_loss
from dualssl.losses.segmentation import segmentation_loss
from dualssl.losses.uncertainty import band_radius


class DualSSLLoss(nn.Module):
    """``DualSSLLoss(loss_cfg, spacing)``; ``spacing`` is the data's voxel size in mm ``(X, Y, Z)``.

    Per step::

        image_in, corrupt_mask = loss.corrupt(image, label)          # identity, None if lambda_rec == 0
        outputs = model(image_in, embeddings=cfg.contrastive_on, restoration=cfg.restoration_on)
        parts = loss(outputs, label, image, corrupt_mask)            # dict(loss, seg, con, rec)
        parts["loss"].backward()

    Shapes: image ``(B, C, X, Y, Z)`` in [0, 1]; label ``(B, 1, X, Y, Z)`` in {0, 1}; outputs as
    returned by ``DualSSLNet``; every part is a float32 scalar tensor.
    """

    def __init__(self, loss_cfg: LossConfig, spacing: Sequence[float]) -> None:
        super().__init__()
        loss_cfg.validate()
        band_radius(spacing, loss_cfg.band_mm)  # checks spacing
        self.cfg = loss_cfg
        self.spacing = tuple(float(s) for s in spacing)
        self.seg = segmentation_loss()
        self.contrastive = StructureContrastiveLoss(
            loss_cfg.tau, ring_kernel=tuple(loss_cfg.ring_kernel),  # type: ignore[arg-type]
            min_pos_voxels=loss_cfg.min_pos_voxels, min_neg_voxels=loss_cfg.min_neg_voxels)

    @torch.no_grad()
    def corrupt(self, image: torch.Tensor, label: torch.Tensor, *,
                probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network input and corrupted voxels: ``(image_in (B, C, X, Y, Z), corrupt_mask (B, 1, X, Y, Z) bool | None)``.

        Identity and ``None`` when ``loss.lambda_rec == 0``. With ``loss.entropy_widen`` the caller
        passes ``probs`` ``(B, K, X, Y, Z)``, softmax probabilities of a prediction of this batch
        (e.g. a no-grad forward of the clean image); high-entropy voxels then join the band.
        """
        if not self.cfg.restoration_on:
            return image, None
        if self.cfg.entropy_widen and probs is None:
            raise ValueError("loss.entropy_widen is on but corrupt() got no probs: pass probs=softmax of a "
                             "prediction of this batch, or set loss.entropy_widen=false")
        return corrupt_region(image, label, self.spacing, ratio=self.cfg.corruption_ratio,
                              band_mm=self.cfg.band_mm, probs=probs if self.cfg.entropy_widen else None,
                              entropy_threshold=self.cfg.entropy_threshold)

    def forward(self, outputs: dict[str, torch.Tensor], label: torch.Tensor, clean_image: torch.Tensor,
                corrupt_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``dict(loss, seg, con, rec)``: the total and its unweighted parts."""
        if "logits" not in outputs:
            raise ValueError("outputs has no 'logits': pass the dict returned by DualSSLNet.forward")
        logits = outputs["logits"]
        if label.dim() != 5 or label.shape[1] != 1 or label.shape[0] != logits.shape[0] \
                or label.shape[2:] != logits.shape[2:]:
            raise ValueError(f"label must be (B, 1, X, Y, Z) matching logits {list(logits.shape)}, "
                             f"got {list(label.shape)}")
        zero = torch.zeros((), device=logits.device)
        seg = self.seg(logits.float(), label)
        total, con, rec = seg, zero, zero
        if self.cfg.contrastive_on:
            if "embeddings" not in outputs:
                raise ValueError("loss.lambda_con > 0 but outputs has no 'embeddings': call "
                                 "model(x, embeddings=loss_cfg.contrastive_on, ...)")
            con = self.contrastive(outputs["embeddings"], label)
            total = total + self.cfg.lambda_con * con
        if self.cfg.restoration_on:
            if "restored" not in outputs or corrupt_mask is None:
                raise ValueError("loss.lambda_rec > 0 needs outputs['restored'] (call model(x, "
                                 "restoration=loss_cfg.restoration_on)) and the corrupt_mask from corrupt()")
            rec = restoration_loss(outputs["restored"], clean_image, corrupt_mask, self.cfg.rec_loss)
            total = total + self.cfg.lambda_rec * rec
        return {"loss": total, "seg": seg, "con": con, "rec": rec}
