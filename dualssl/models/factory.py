"""Config -> modules, the only place where ``ModelConfig`` becomes a network.

``DualSSLNet`` (training: logits plus, on request, embeddings and the restored image) and
``SegmentationNet`` (inference and export: logits only, TorchScript-able) share the same backbone
and segmentation head, so one state dict serves both.
"""

from __future__ import annotations

from torch import Tensor, nn

from dualssl.config import ModelConfig
from dualssl.models.heads import ProjectionHead, RestorationHead, SegmentationHead
from dualssl.models.unet3d import ResidualUNet3D


class DualSSLNet(nn.Module):
    """Residual U-Net with a segmentation head, a projection head and a restoration head.

    ``forward(x, *, embeddings=False, restoration=False)`` on ``x (B, C_in, X, Y, Z)`` (sizes
    multiples of 8) returns a dict:

    * ``logits``: ``(B, K, X, Y, Z)``, always;
    * ``embeddings``: ``(B, E, X/8, Y/8, Z/8)``, L2-normalised over E, only when ``embeddings=True``;
    * ``restored``: ``(B, C_in, X, Y, Z)`` in [0, 1], only when ``restoration=True``;
    * ``logits_half``, ``logits_quarter``: ``(B, K, X/2, Y/2, Z/2)`` and ``(B, K, X/4, Y/4, Z/4)``, only
      when ``deep_supervision=True`` (needs ``ds_heads``, built with ``model.deep_supervision``).

    Heads not asked for are not run (no compute, no graph).
    """

    def __init__(self, backbone: ResidualUNet3D, seg_head: SegmentationHead,
                 proj_head: ProjectionHead, rec_head: RestorationHead,
                 ds_heads: nn.ModuleList | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.seg_head = seg_head
        self.proj_head = proj_head
        self.rec_head = rec_head
        self.ds_heads = ds_heads if ds_heads is not None else nn.ModuleList()

    def forward(self, x: Tensor, *, embeddings: bool = False, restoration: bool = False,
                deep_supervision: bool = False) -> dict[str, Tensor]:
        if deep_supervision and len(self.ds_heads) != 2:
            raise ValueError("deep_supervision=True but the net has no deep-supervision heads: build it "
                             "with model.deep_supervision=true")
        bottleneck, pyramid = self.backbone.decode(x)
        features = pyramid[0]
        out = {"logits": self.seg_head(features)}
        if deep_supervision:
            out["logits_half"] = self.ds_heads[0](pyramid[1])
            out["logits_quarter"] = self.ds_heads[1](pyramid[2])
        if embeddings:
            out["embeddings"] = self.proj_head(bottleneck)
        if restoration:
            out["restored"] = self.rec_head(features)
        return out


class SegmentationNet(nn.Module):
    """Logits only: ``forward(x (B, C_in, X, Y, Z)) -> (B, K, X, Y, Z)``.

    Holds the very modules of ``net`` (no copy), so weights trained in ``net`` are used as they
    are; its state dict has only ``backbone.*`` and ``seg_head.*``. Works with
    ``torch.jit.script``, ``torch.jit.trace`` and ``monai.inferers.sliding_window_inference``.
    """

    def __init__(self, net: DualSSLNet) -> None:
        super().__init__()
        self.backbone = net.backbone
        self.seg_head = net.seg_head

    def forward(self, x: Tensor) -> Tensor:
        _, features = self.backbone(x)
        return self.seg_head(features)


def build_model(cfg: ModelConfig) -> DualSSLNet:
    """Build the network described by ``cfg`` (validated first: bad fields raise ``ConfigError``)."""
    cfg.validate()
    backbone = ResidualUNet3D(cfg.in_channels, cfg.widths, norm_groups=cfg.norm_groups,
                              last_dilation=cfg.last_dilation, dropout=cfg.dropout)
    w0, w1, w3 = backbone.widths[0], backbone.widths[1], backbone.widths[3]
    ds_heads = (nn.ModuleList([SegmentationHead(w0, cfg.num_classes), SegmentationHead(w1, cfg.num_classes)])
                if cfg.deep_supervision else None)
    return DualSSLNet(
        backbone,
        SegmentationHead(w0, cfg.num_classes),
        ProjectionHead(w3, cfg.embed_dim),
        RestorationHead(w0, cfg.in_channels),
        ds_heads,
    )
