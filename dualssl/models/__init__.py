"""The network: a 3D residual U-Net with segmentation, projection and restoration heads."""

from dualssl.models.factory import DualSSLNet, SegmentationNet, build_model
from dualssl.models.heads import ProjectionHead, RestorationHead, SegmentationHead
from dualssl.models.unet3d import PreActResBlock, ResidualUNet3D, WSConv3d

__all__ = [
    "DualSSLNet", "SegmentationNet", "build_model",
    "ProjectionHead", "RestorationHead", "SegmentationHead",
    "PreActResBlock", "ResidualUNet3D", "WSConv3d",
]
