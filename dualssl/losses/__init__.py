"""Losses: Dice+CE, structure-guided contrastive, band restoration, and their weighted total."""

from dualssl.losses.composite import DualSSLLoss
from dualssl.losses.contrastive import StructureContrastiveLoss, SupervisedNTXentLoss
from dualssl.losses.corruptions import CORRUPTION_TABLE, corrupt_batch, select_voxels
from dualssl.losses.restoration import Corrupted, corrupt_region, restoration_loss
from dualssl.losses.sampling import CellSamples, sample_batch, sample_cells, sample_volume
from dualssl.losses.segmentation import segmentation_loss
from dualssl.losses.thinning import thin
from dualssl.losses.uncertainty import boundary_band, uncertainty_region

__all__ = [
    "Corrupted", "DualSSLLoss", "StructureContrastiveLoss", "SupervisedNTXentLoss", "CORRUPTION_TABLE",
    "corrupt_batch", "select_voxels", "corrupt_region", "restoration_loss", "CellSamples", "sample_batch",
    "sample_cells", "sample_volume", "segmentation_loss", "boundary_band", "thin", "uncertainty_region",
]
