"""Losses: supervised NT-Xent against its formula, structure sampling, the band, the restoration term, the total."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

from dualssl.config import Config, ConfigError, LossConfig
from dualssl.losses import DualSSLLoss, StructureContrastiveLoss, SupervisedNTXentLoss, boundary_band
from dualssl.losses.contrastive import gather_cells
from dualssl.losses.restoration import restoration_loss
from dualssl.losses.sampling import ring_mask, sample_batch, sample_volume
from dualssl.losses.segmentation import segmentation_loss
from dualssl.losses.uncertainty import uncertainty_region

SPACING = (1.5, 1.5, 2.0)


def tube_label(shape=(48, 48, 32), spacing=SPACING, radius_mm=9.0, seed=0) -> np.ndarray:
    """A bent tube across the patch, pancreas-like in size (bool ``(X, Y, Z)``)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, 100)
    line = np.zeros(shape, bool)
    cx = (0.1 + 0.8 * t) * shape[0]
    cy = (0.35 + 0.3 * np.sin(np.pi * t) + rng.uniform(-0.05, 0.05)) * shape[1]
    cz = (0.3 + 0.4 * t) * shape[2]
    line[cx.astype(int), cy.astype(int), cz.astype(int)] = True
    return ndimage.distance_transform_edt(~line, sampling=spacing) <= radius_mm


def supcon_numpy(z: np.ndarray, y: np.ndarray, tau: float) -> float:
    """The SupCon formula, one anchor and one pair at a time."""
    n = len(z)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(z[i] @ z[a] / tau) for a in range(n) if a != i)
        per_anchor.append(-np.mean([math.log(math.exp(z[i] @ z[p] / tau) / denominator) for p in positives]))
    return float(np.mean(per_anchor))


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_ntxent_matches_the_formula(tau):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(7, 5))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = np.array([1, 0, 1, 1, 0, 0, 2])  # class 2 has no positive: not an anchor, still in denominators
    got = SupervisedNTXentLoss(tau)(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    assert got.item() == pytest.approx(supcon_numpy(z, y, tau), rel=1e-4)


def test_ntxent_checks_its_inputs():
    loss = SupervisedNTXentLoss(0.1)
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        loss(torch.rand(2, 3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        loss(torch.rand(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="loss.tau"):
        SupervisedNTXentLoss(0.0)


def test_sampling_finds_skeleton_positives_and_ring_negatives():
    mask = tube_label()
    pos, neg = sample_volume(mask, ring_kernel=(10, 20), min_pos_voxels=3, min_neg_voxels=5,
                             rng=np.random.default_rng(0))
    assert len(pos) >= 2 and len(neg) >= 2
    cells = mask.reshape(6, 8, 6, 8, 4, 8)
    any_pancreas = cells.any(axis=(1, 3, 5))
    skeleton = skeletonize(any_pancreas)
    for x, y, z in pos:
        assert skeleton[x, y, z]
    assert len(set(pos[:, 2])) == len(pos) and len(set(neg[:, 2])) == len(neg)  # one per axial slice
    assert all(any_pancreas[..., z].sum() >= 3 for z in pos[:, 2])
    ring_any = ring_mask(mask, 20).reshape(6, 8, 6, 8, 4, 8).any(axis=(1, 3, 5))
    for x, y, z in neg:
        assert not any_pancreas[x, y, z] and ring_any[x, y, z]
    # a stricter slice threshold only removes slices
    strict, _ = sample_volume(mask, ring_kernel=(10, 20), min_pos_voxels=100, min_neg_voxels=5,
                              rng=np.random.default_rng(0))
    assert len(strict) == 0


def test_sampling_on_real_msd_masks(shared_data):
    """Real pancreas shapes (MSD Task07) resampled to 1.5x1.5x2 mm, one 96x96x64 patch around each."""
    files = sorted((shared_data / "labels" / "msd_task07_pancreas").glob("*.nii.gz"))[:3]
    assert files, "no MSD masks found"
    rng = np.random.default_rng(0)
    for path in files:
        img = nib.load(path)
        mask = np.asarray(img.dataobj) > 0
        mask = mask[ndimage.find_objects(mask.astype(np.uint8))[0]]  # the pancreas' bounding box
        zoom = [s / t for s, t in zip(img.header.get_zooms()[:3], SPACING)]
        mask = ndimage.zoom(mask.astype(np.float32), zoom, order=1) > 0.5
        centre = np.argwhere(mask).mean(0).astype(int)
        lo = [int(np.clip(c - p // 2, 0, max(s - p, 0))) for c, p, s in zip(centre, (96, 96, 64), mask.shape)]
        patch = np.zeros((96, 96, 64), bool)
        crop = mask[lo[0]:lo[0] + 96, lo[1]:lo[1] + 96, lo[2]:lo[2] + 64]
        patch[:crop.shape[0], :crop.shape[1], :crop.shape[2]] = crop
        pos, neg = sample_volume(patch, ring_kernel=(10, 20), min_pos_voxels=10, min_neg_voxels=5, rng=rng)
        cells = patch.reshape(12, 8, 12, 8, 8, 8).mean(axis=(1, 3, 5))
        assert len(pos) >= 1 and len(neg) >= 1, path.name
        assert all(cells[x, y, z] > 0 for x, y, z in pos) and all(cells[x, y, z] == 0 for x, y, z in neg)


def test_structure_loss_is_sampling_then_formula():
    torch.manual_seed(0)
    label = torch.from_numpy(np.stack([tube_label(seed=0), tube_label(seed=1)])[:, None].astype(np.float32))
    emb = torch.nn.functional.normalize(torch.rand(2, 6, 6, 6, 4), dim=1).requires_grad_()
    loss = StructureContrastiveLoss(tau=0.1, min_pos_voxels=3, backend="reference")
    value = loss(emb, label, rng=np.random.default_rng(5))
    samples = sample_batch(label, ring_kernel=(10, 20), min_pos_voxels=3, min_neg_voxels=5,
                           rng=np.random.default_rng(5))
    assert loss.last_counts == (samples.num_pos, samples.num_neg) and samples.num_pos >= 2
    feats = gather_cells(emb, samples).detach().numpy()
    assert value.item() == pytest.approx(supcon_numpy(feats, samples.is_pancreas, 0.1), rel=1e-4)
    value.backward()
    assert emb.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["device", "reference"])
@pytest.mark.parametrize("case", ["no pancreas", "no ring"])
def test_empty_batch_gives_finite_zero_with_zero_gradient(case, backend):
    label = torch.zeros(2, 1, 32, 32, 16) if case == "no pancreas" else torch.ones(2, 1, 32, 32, 16)
    emb = torch.nn.functional.normalize(torch.rand(2, 4, 4, 4, 2), dim=1).requires_grad_()
    rng = {"rng": np.random.default_rng(0)} if backend == "reference" else {}
    value = StructureContrastiveLoss(tau=0.05, backend=backend)(emb, label, **rng)
    assert value.item() == 0.0
    value.backward()
    assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))


def test_structure_loss_checks_shapes():
    loss = StructureContrastiveLoss(tau=0.1)
    with pytest.raises(ValueError, match="1/8"):
        loss(torch.rand(1, 4, 4, 4, 4), torch.zeros(1, 1, 32, 32, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        loss(torch.rand(1, 4, 4, 4, 2), torch.zeros(1, 32, 32, 16))
    with pytest.raises(ValueError, match="backend"):
        StructureContrastiveLoss(tau=0.1, backend="numpy")
    with pytest.raises(ValueError, match="generator"):  # a NumPy generator drives the reference backend only
        loss(torch.rand(1, 4, 4, 4, 2), torch.zeros(1, 1, 32, 32, 16), rng=np.random.default_rng(0))


def test_band_is_dilate_minus_erode_in_mm():
    label = np.zeros((30, 30, 20), bool)
    label[8:22, 10:20, 5:15] = True
    spacing, band_mm = (1.0, 0.5, 3.0), 3.0  # half-widths 3, 6 and 1 voxels
    band = boundary_band(torch.from_numpy(label)[None, None], spacing, band_mm)[0, 0].numpy()
    box = np.ones((7, 13, 3), bool)
    expected = ndimage.binary_dilation(label, box) & ~ndimage.binary_erosion(label, box, border_value=1)
    assert np.array_equal(band, expected)
    # along x the band reaches 3 mm (3 voxels) outside the label, along y 6 voxels, along z 1
    assert band[5, 15, 10] and not band[4, 15, 10]
    assert band[15, 4, 10] and not band[15, 3, 10]
    assert band[15, 15, 4] and not band[15, 15, 3]


def test_entropy_widens_the_band():
    label = torch.zeros(1, 1, 24, 24, 16)
    label[:, :, 8:16, 8:16, 4:12] = 1
    probs = torch.zeros(1, 2, 24, 24, 16)
    probs[:, 0], probs[:, 1] = 0.99, 0.01
    probs[:, :, 0:3, 0:3, 0:3] = 0.5  # maximal entropy, far from the boundary
    band = boundary_band(label, SPACING, 3.0)
    wide = uncertainty_region(label, SPACING, 3.0, probs=probs, entropy_threshold=0.5)
    assert wide[0, 0, 0:3, 0:3, 0:3].all() and not band[0, 0, 0:3, 0:3, 0:3].any()
    expected = band.clone()
    expected[0, 0, 0:3, 0:3, 0:3] = True
    assert torch.equal(wide, expected)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_restoration_loss_on_the_corrupted_voxels_only(kind):
    torch.manual_seed(0)
    clean, restored = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    mask = torch.rand(2, 1, 8, 8, 8) > 0.7
    err = (restored - clean)[mask]
    expected = err.abs().mean() if kind == "l1" else (err ** 2).mean()
    assert restoration_loss(restored, clean, mask, kind).item() == pytest.approx(expected.item(), rel=1e-5)
    restored.requires_grad_()
    empty = restoration_loss(restored, clean, torch.zeros_like(mask), kind)
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(restored.grad, torch.zeros_like(restored))


def test_segmentation_loss_ranks_predictions():
    label = torch.zeros(1, 1, 8, 8, 8)
    label[..., 2:6, 2:6, 2:6] = 1
    good = torch.cat([1 - label, label], dim=1) * 20 - 10
    loss = segmentation_loss()
    assert loss(good, label).item() < 0.01 < 1.5 < loss(-good, label).item()


def _batch():
    label = torch.from_numpy(np.stack([tube_label(seed=0), tube_label(seed=3)])[:, None].astype(np.float32))
    image = (0.4 + 0.3 * label + 0.05 * torch.randn_like(label)).clamp(0, 1)
    return image, label


def test_total_with_both_branches():
    torch.manual_seed(0)
    cfg = LossConfig(lambda_con=0.3, lambda_rec=0.7, min_pos_voxels=3, corruption_ratio=0.5, rec_crop=0.5)
    crit = DualSSLLoss(cfg, SPACING)
    image, label = _batch()
    before = image.clone()
    corrupted = crit.corrupt(image, label)
    assert torch.equal(image, before)  # the clean patch is not touched
    assert corrupted.image.shape == (2, 1, 24, 24, 16) and corrupted.mask.any()
    keep = ~corrupted.mask.expand_as(corrupted.clean)
    assert torch.equal(corrupted.image[keep], corrupted.clean[keep])
    outputs = {"logits": torch.randn(2, 2, 48, 48, 32, requires_grad=True),
               "embeddings": torch.nn.functional.normalize(torch.rand(2, 8, 6, 6, 4), dim=1).requires_grad_()}
    rec_outputs = {"logits": torch.randn(2, 2, 24, 24, 16, requires_grad=True),
                   "restored": torch.rand(2, 1, 24, 24, 16, requires_grad=True)}
    parts = crit(outputs, label, rec_outputs, corrupted)
    assert set(parts) == {"loss", "seg", "con", "rec"}
    assert parts["con"].item() > 0 and parts["rec"].item() > 0
    expected_rec = restoration_loss(rec_outputs["restored"], corrupted.clean, corrupted.mask)
    assert parts["rec"].item() == pytest.approx(expected_rec.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(parts["seg"].item() + 0.3 * parts["con"].item()
                                                 + 0.7 * parts["rec"].item(), rel=1e-6)
    parts["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in outputs.values())
    assert rec_outputs["restored"].grad.abs().sum() > 0
    assert rec_outputs["logits"].grad is None  # the corrupted forward's logits are never scored


def test_switched_off_branches_are_exact_zeros_and_not_needed():
    crit = DualSSLLoss(LossConfig(lambda_con=0.0, lambda_rec=0.0), SPACING)
    image, label = _batch()
    assert crit.corrupt(image, label) is None
    logits = torch.randn(2, 2, 48, 48, 32, requires_grad=True)
    parts = crit({"logits": logits}, label)  # no embeddings, no restoration forward: nothing asks for them
    assert parts["con"].item() == 0.0 and parts["rec"].item() == 0.0
    assert torch.equal(parts["loss"], parts["seg"])
    with pytest.raises(ValueError, match="loss.lambda_con"):
        DualSSLLoss(LossConfig(lambda_con=0.1, lambda_rec=0.0), SPACING)({"logits": logits}, label)
    with pytest.raises(ValueError, match="loss.lambda_rec"):
        DualSSLLoss(LossConfig(lambda_con=0.0, lambda_rec=0.1), SPACING)({"logits": logits}, label)


def test_entropy_widen_needs_probabilities():
    crit = DualSSLLoss(LossConfig(entropy_widen=True, rec_crop=1.0), SPACING)
    image, label = _batch()
    with pytest.raises(ValueError, match="loss.entropy_widen"):
        crit.corrupt(image, label)
    probs = torch.full((2, 2, 48, 48, 32), 0.5)  # maximal entropy everywhere: the whole patch is the region
    corrupted = crit.corrupt(image, label, probs=probs)
    assert corrupted.mask.float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("field, value", [("tau", 0.0), ("tau", -0.1), ("corruption_ratio", 1.5),
                                          ("corruption_ratio", -0.1), ("lambda_con", -1.0),
                                          ("lambda_rec", -0.5), ("entropy_threshold", 1.5),
                                          ("min_pos_voxels", -1), ("rec_crop", 0.0), ("rec_crop", 1.5)])
def test_bad_loss_config_names_the_field(field, value):
    cfg = Config().with_overrides({f"loss.{field}": value})
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        cfg.validate()
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        DualSSLLoss(cfg.loss, SPACING)


def test_bad_spacing_is_named():
    with pytest.raises(ValueError, match="data.spacing"):
        DualSSLLoss(LossConfig(), (1.5, 0.0, 2.0))
