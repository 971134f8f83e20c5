"""The training step's label-side work on the device: the same cells and voxels as the NumPy references.

Contrastive sampling (pooling, ring, skeletons, one pick per slice), band, voxel selection and
corruption: each device path against a reference, on fixed hand-built labels (B = 2, anisotropic
spacing). The skeletons are compared with NumPy references of their own definition
(``dualssl.losses.thinning``), which in turn are checked against scikit-image. Then: the device path
reads nothing back to the host, and a one-step fit with ``optim.compile``.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize
from torch.overrides import TorchFunctionMode

from dualssl.config import LossConfig
from dualssl.losses import DualSSLLoss, StructureContrastiveLoss, SupervisedNTXentLoss, boundary_band
from dualssl.losses.contrastive import gather_cells
from dualssl.losses.corruptions import (corrupt_batch, corrupt_batch_reference, select_voxels,
                                        select_voxels_reference)
from dualssl.losses.restoration import corrupt_region, crop_size, restoration_loss
from dualssl.losses.sampling import (_pool_any, box_dilate, negative_cells, pool_any, ring_cells,
                                     ring_cells_reference, ring_skeleton_cells, sample_cells, skeleton_cells)
from dualssl.losses.thinning import thin, thin_reference

SPACING = (1.2, 0.9, 2.5)  # mm, anisotropic on every axis
PATCH = (64, 64, 40)  # bottleneck grid 8 x 8 x 5


def _grid_mm(shape=PATCH, spacing=SPACING) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)


def shape_label(kind: str) -> np.ndarray:
    """A hand-built label ``PATCH`` bool, sizes in mm."""
    g = _grid_mm()
    centre = np.array(PATCH) * SPACING / 2
    if kind == "tube":  # bent tube across the patch, radius 8 mm
        t = np.linspace(0, 1, 200)
        line = np.zeros(PATCH, bool)
        xs, ys, zs = (0.12 + 0.76 * t) * PATCH[0], (0.3 + 0.4 * np.sin(np.pi * t)) * PATCH[1], \
            (0.3 + 0.4 * t) * PATCH[2]
        line[xs.astype(int), ys.astype(int), zs.astype(int)] = True
        return ndimage.distance_transform_edt(~line, sampling=SPACING) <= 8.0
    if kind == "ellipsoid":
        return ((((g - centre) / (24.0, 16.0, 30.0)) ** 2).sum(-1) <= 1)
    if kind == "l_block":
        def box(lo, hi):
            return np.all((g > lo) & (g < hi), axis=-1)
        return box((10, 12, 20), (60, 26, 70)) | box((10, 12, 20), (24, 50, 70))
    if kind == "two_blobs":
        left = ((((g - centre + (18, 0, 0)) / (12.0, 12.0, 20.0)) ** 2).sum(-1) <= 1)
        right = ((((g - centre - (20, 8, 10)) / (10.0, 14.0, 16.0)) ** 2).sum(-1) <= 1)
        return left | right
    if kind == "ring_slab":  # a thick plate with a hole: one tunnel
        plate = (np.abs(g[..., 2] - centre[2]) < 18) & (np.abs(g[..., 0] - centre[0]) < 28) \
            & (np.abs(g[..., 1] - centre[1]) < 22)
        return plate & (np.hypot(g[..., 0] - centre[0], g[..., 1] - centre[1]) > 10)
    raise ValueError(kind)


PAIRS = [("tube", "ellipsoid"), ("l_block", "two_blobs"), ("ring_slab", "tube")]


def label_batch(pair: tuple[str, str]) -> torch.Tensor:
    """``(2, 1, *PATCH)`` float label of a pair of shapes."""
    return torch.from_numpy(np.stack([shape_label(k) for k in pair])[:, None].astype(np.float32))


def random_blobs(seed: int, n: int = 4, shape=(8, 7, 6)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.random(shape), 1.2) > 0.5 for _ in range(n)])


# --- pooling, ring, box dilation -------------------------------------------------------------------

def test_box_dilation_is_scipys_maximum_filter():
    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((2, 40, 36, 24)), (0, 2, 2, 2)) > 0.53
    for sizes in ([[10, 10, 7], [17, 17, 14]], [[20, 1, 2], [3, 12, 19]], [[1, 1, 1], [40, 36, 24]]):
        got = box_dilate(torch.from_numpy(mask), torch.tensor(sizes)).numpy()
        pooled = box_dilate(torch.from_numpy(mask), torch.tensor(sizes), stride=8).numpy()
        for b in range(2):  # even sizes included: SciPy's window placement
            ref = ndimage.maximum_filter(mask[b], size=sizes[b], mode="constant", cval=False)
            assert np.array_equal(got[b], ref), sizes[b]
            assert np.array_equal(pooled[b], _pool_any(ref)), sizes[b]  # the dilation pooled in the same pass


@pytest.mark.parametrize("pair", PAIRS)
def test_pooled_mask_and_ring_cells_are_the_references(pair):
    label = label_batch(pair)
    mask = label[:, 0] > 0.5
    assert np.array_equal(pool_any(mask).numpy(), np.stack([_pool_any(m) for m in mask.numpy()]))
    for ks in ((10, 17), (20, 13)):
        got = ring_cells(mask, torch.tensor(ks)).numpy()
        for b, k in enumerate(ks):
            ref = ring_cells_reference(mask[b].numpy(), k)
            assert ref.any() and np.array_equal(got[b], ref), (pair[b], k)


# --- skeletons ---------------------------------------------------------------------------------------

def _low(pair) -> np.ndarray:
    return pool_any(label_batch(pair)[:, 0] > 0.5).numpy()


def _ring_slices(pair, k=15) -> np.ndarray:
    """Non-empty axial slices ``(n, x, y)`` of the ring cells of a pair."""
    mask = label_batch(pair)[:, 0] > 0.5
    ring = ring_cells(mask, torch.full((2,), k)).numpy()
    slices = ring.transpose(0, 3, 1, 2).reshape(-1, *ring.shape[1:3])
    return slices[slices.any(axis=(1, 2))]


def _volumes() -> list[np.ndarray]:
    return [v for pair in PAIRS for v in _low(pair)] + list(random_blobs(1))


def test_thinning_reference_in_raster_order_is_skimage():
    """The reference of ``thin`` visits candidates in scikit-image's raster order: it IS skeletonize
    (Lee's 3D thinning; the ring slices with Lee's 2D thinning), so its predicates are right."""
    for volume in _volumes():
        assert np.array_equal(thin_reference(volume, order="raster"), skeletonize(volume))
    for pair in PAIRS[:2]:
        for image in _ring_slices(pair):
            assert np.array_equal(thin_reference(image[None], order="raster")[0], skeletonize(image, method="lee"))


def test_device_thinning_is_its_reference():
    """``thin`` (parity classes recheck, on the device) against the one-voxel-at-a-time NumPy reference
    of the same definition, in 3D and 2D; every run converged within the default rounds."""
    volumes = _volumes()
    got, converged = thin(torch.from_numpy(np.stack([v for v in volumes if v.shape == volumes[0].shape])),
                          stop_early=False, return_converged=True)  # the fixed rounds of an accelerator
    assert converged.all()
    for volume, skeleton in zip(volumes, got):
        assert np.array_equal(skeleton.numpy(), thin_reference(volume))
    blobs = random_blobs(2)
    for volume, skeleton in zip(blobs, thin(torch.from_numpy(blobs))):
        assert np.array_equal(skeleton.numpy(), thin_reference(volume))
    images = np.concatenate([_ring_slices(pair) for pair in PAIRS])
    got2d, converged2d = thin(torch.from_numpy(images)[:, None], stop_early=False, return_converged=True)
    assert converged2d.all()
    for image, skeleton in zip(images, got2d[:, 0]):
        assert np.array_equal(skeleton.numpy(), thin_reference(image[None])[0])


def test_device_skeletons_have_skimages_topology_and_sit_inside():
    """Where ``thin`` and scikit-image differ (the recheck order), the skeletons still have the same
    26-connected pieces and Euler number, and lie inside the mask. (Neither always keeps the mask's:
    both recheck simplicity only, so the last voxels of a small piece can go, as in ``two_blobs``.)"""
    for volume in _volumes():
        skeleton, reference = thin(torch.from_numpy(volume)[None])[0].numpy(), skeletonize(volume)
        assert skeleton.any() and not (skeleton & ~volume).any()
        for measure in (lambda m: ndimage.label(m, np.ones((3, 3, 3)))[1], lambda m: euler_number(m, connectivity=3)):
            assert measure(skeleton) == measure(reference) and measure(skeleton) <= measure(volume)


# --- the contrastive samples -------------------------------------------------------------------------

def _reference_slots(candidates: np.ndarray, eligible: np.ndarray, scores: np.ndarray):
    """One pick per slice in NumPy: the candidate of highest score, slices that are eligible and hold one."""
    xy, valid = [], []
    for z in range(candidates.shape[2]):
        score = np.where(candidates[..., z], scores[..., z], -1.0)
        xy.append(np.unravel_index(np.argmax(score), score.shape))
        valid.append(bool(eligible[z] and candidates[..., z].any()))
    return np.array(xy), np.array(valid)


@pytest.mark.parametrize("pair", PAIRS)
def test_device_sampling_selects_the_reference_cells(pair):
    """Given the same k and the same uniform scores, ``sample_cells`` picks exactly the cells of the
    NumPy reference (reference pooling, ring, slice thresholds, thinning reference, argmax of scores).

    Against the original skimage sampling: the eligible slices and the ring are the same; negatives
    come from the same slices (a thinning keeps a cell of every non-empty ring slice)."""
    label = label_batch(pair)
    mask = (label[:, 0] > 0.5).numpy()
    k = torch.tensor([12, 19])
    torch.manual_seed(3)
    got = sample_cells(label, ring_kernel=(10, 20), min_pos_voxels=3, min_neg_voxels=3, k=k)
    torch.manual_seed(3)  # the draws sample_cells made: positive scores, then negative scores
    scores = [torch.rand(2, 8, 8, 5).numpy(), torch.rand(2, 8, 8, 5).numpy()]
    index, valid = got.index.numpy().reshape(2, 2, 5, 4), got.valid.numpy().reshape(2, 2, 5)
    assert got.index.dtype == torch.long and got.valid.dtype == torch.bool
    assert got.is_pancreas.tolist() == [True] * 10 + [False] * 10
    for b in range(2):
        mask_low = _pool_any(mask[b])
        ring_low = ring_cells_reference(mask[b], int(k[b]))
        pos_eligible, neg_eligible = mask_low.sum(axis=(0, 1)) >= 3, ring_low.sum(axis=(0, 1)) >= 3
        ring_skeleton = np.stack([thin_reference(ring_low[..., z][None])[0] for z in range(5)], axis=-1)
        for kind, (cand, eligible) in enumerate(((thin_reference(mask_low), pos_eligible),
                                                 (ring_skeleton, neg_eligible))):
            ref_xy, ref_valid = _reference_slots(cand, eligible, scores[kind][b])
            assert np.array_equal(valid[kind, b], ref_valid), (pair[b], kind)
            assert np.array_equal(index[kind, b][ref_valid, 1:3], ref_xy[ref_valid])
            assert (index[kind, b][:, 0] == b).all() and np.array_equal(index[kind, b][:, 3], np.arange(5))
        # the original (skimage) sampling shares eligibility and ring, and the negative slices
        zhang_slices = negative_cells(ring_low, 3, np.random.default_rng(0))[:, 2]
        assert sorted(zhang_slices.tolist()) == np.flatnonzero(valid[1, b]).tolist()
        assert valid[0, b].sum() >= 1 and not (valid[0, b] & ~pos_eligible).any()
        skeleton = skeleton_cells(torch.from_numpy(mask_low)[None])[0].numpy()
        assert skeleton[tuple(index[0, b][valid[0, b], 1:].T)].all()
    assert got.num_pos == int(valid[0].sum()) and got.num_neg == int(valid[1].sum())


def supcon_numpy(z: np.ndarray, y: np.ndarray, tau: float) -> float:
    """The SupCon formula, one anchor and one pair at a time."""
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if positives:
            denominator = sum(math.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
            per_anchor.append(-np.mean([math.log(math.exp(z[i] @ z[p] / tau) / denominator) for p in positives]))
    return float(np.mean(per_anchor))


def test_masked_ntxent_is_the_ntxent_of_the_valid_rows():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(9, 6), dim=1).requires_grad_()
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1])
    valid = torch.tensor([True, True, False, True, True, False, True, True, False])
    loss = SupervisedNTXentLoss(0.1)
    value = loss(feats, labels, valid=valid)
    assert value.item() == pytest.approx(loss(feats[valid], labels[valid]).item(), rel=1e-5)
    value.backward()
    assert torch.equal(feats.grad[~valid], torch.zeros_like(feats.grad[~valid]))
    nothing = loss(feats, labels, valid=torch.zeros(9, dtype=torch.bool))
    assert nothing.item() == 0.0 and math.isfinite(nothing.item())


def test_device_contrastive_loss_is_sampling_then_formula():
    label = label_batch(PAIRS[0])
    emb = torch.nn.functional.normalize(torch.rand(2, 6, 8, 8, 5), dim=1).requires_grad_()
    loss = StructureContrastiveLoss(tau=0.1, min_pos_voxels=3, min_neg_voxels=3)
    generator = torch.Generator().manual_seed(5)
    value = loss(emb, label, generator=generator)
    samples = sample_cells(label, ring_kernel=(10, 20), min_pos_voxels=3, min_neg_voxels=3,
                           generator=torch.Generator().manual_seed(5))
    assert [int(c) for c in loss.last_counts] == [int(samples.num_pos), int(samples.num_neg)]
    assert int(samples.num_pos) >= 2 and int(samples.num_neg) >= 2
    feats = gather_cells(emb, samples).detach().numpy()[samples.valid.numpy()]
    expected = supcon_numpy(feats, samples.is_pancreas.numpy()[samples.valid.numpy()], 0.1)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert emb.grad.abs().sum() > 0


# --- band, voxel selection, corruption -----------------------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS[:2])
def test_band_is_dilate_minus_erode_per_sample(pair):
    label = label_batch(pair)
    band = boundary_band(label, SPACING, 4.0)[:, 0].numpy()
    box = np.ones([2 * round(4.0 / s) + 1 for s in SPACING], bool)  # half-widths 3, 4, 2 voxels
    for b, mask in enumerate((label[:, 0] > 0.5).numpy()):
        ref = ndimage.binary_dilation(mask, box) & ~ndimage.binary_erosion(mask, box, border_value=1)
        assert np.array_equal(band[b], ref)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_voxel_selection_is_the_reference(ratio):
    region = boundary_band(label_batch(PAIRS[1]), SPACING, 4.0)
    torch.manual_seed(7)
    got = select_voxels(region, ratio)
    torch.manual_seed(7)
    assert torch.equal(got, select_voxels_reference(region, ratio))
    counts = region.flatten(1).sum(1)
    assert got.flatten(1).sum(1).tolist() == [round(ratio * int(c)) for c in counts] and not (got & ~region).any()


def test_corruption_is_the_reference_voxel_for_voxel():
    """Every voxel of the batch runs through the chain: with every voxel chosen (and every corruption
    drawn by some sample) it is the reference point for point; with fewer chosen voxels it is that
    result at the chosen voxels and the image elsewhere."""
    torch.manual_seed(0)
    image = torch.rand(2, 1, 24, 20, 16)
    full = torch.ones(2, 1, 24, 20, 16, dtype=torch.bool)
    drawn = {"local_pixel_shuffle": torch.tensor([True, False]), "nonlinear_intensity": torch.tensor([True, True]),
             "in_painting": torch.tensor([False, True]), "out_painting": torch.tensor([True, False])}
    torch.manual_seed(1)
    reference = corrupt_batch_reference(image, full, drawn)
    torch.manual_seed(1)
    assert torch.equal(corrupt_batch(image, full, drawn), reference)
    chosen = torch.rand(2, 1, 24, 20, 16) < 0.2
    torch.manual_seed(1)
    assert torch.equal(corrupt_batch(image, chosen, drawn), torch.where(chosen, reference, image))


@pytest.mark.parametrize("crop", [1.0, 0.5])
def test_corrupted_voxels_are_the_references(crop):
    """Same RNG state: the same crop, the same band voxels and the same corrupted (changed) voxels."""
    label = label_batch(PAIRS[0])
    image = (0.4 + 0.3 * label + 0.1 * torch.rand_like(label)).clamp(0, 1)
    out = {}
    for backend in ("device", "reference"):
        torch.manual_seed(11)
        out[backend] = corrupt_region(image, label, SPACING, ratio=0.4, band_mm=4.0, crop=crop, backend=backend)
    dev, ref = out["device"], out["reference"]
    for name in ("origin", "clean", "mask", "region_voxels"):
        assert torch.equal(getattr(dev, name), getattr(ref, name)), name
    keep = ~dev.mask.expand_as(dev.image)
    assert dev.mask.any() and torch.equal(dev.image[keep], dev.clean[keep])


# --- no host round trip --------------------------------------------------------------------------------

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero,
              torch.nonzero, torch.Tensor.__len__}


def _moves_device(func, args, kwargs) -> bool:
    """A ``Tensor.to`` to another device than the tensor's (a host-device copy)."""
    if func is not torch.Tensor.to:
        return False
    targets = [a for a in (*args[1:], (kwargs or {}).get("device")) if isinstance(a, (str, torch.device))]
    return any(torch.device(t) != args[0].device for t in targets)


class RecordHostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values into Python or copies it between devices."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or _moves_device(func, args, kwargs):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _step_inputs(device: str):
    label = label_batch(PAIRS[0]).to(device)
    image = (0.4 + 0.3 * label).clamp(0, 1)
    outputs = {"logits": torch.zeros(2, 2, *PATCH, device=device),
               "embeddings": torch.nn.functional.normalize(torch.ones(2, 8, 8, 8, 5, device=device), dim=1)}
    return image, label, outputs


def _device_step(crit: DualSSLLoss, image, label, outputs):
    """The loss side of a training step without the segmentation term (MONAI's, not ours)."""
    corrupted = crit.corrupt(image, label)
    restored = {"restored": torch.zeros_like(corrupted.clean)}
    con = crit.contrastive(outputs["embeddings"], label)
    rec = restoration_loss(restored["restored"], corrupted.clean, corrupted.mask)
    return corrupted, con, rec


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_step_reads_nothing_back_to_the_host(device):
    crit = DualSSLLoss(LossConfig(min_pos_voxels=3, min_neg_voxels=3), SPACING)
    image, label, outputs = _step_inputs(device)
    _device_step(crit, image, label, outputs)  # warm the per-device tables
    with RecordHostReads() as mode:
        corrupted, con, rec = _device_step(crit, image, label, outputs)
    assert mode.calls == []
    assert con.dtype == rec.dtype == torch.float32 and corrupted.mask.dtype == torch.bool
    assert {t.device.type for t in (con, rec, corrupted.image, corrupted.mask, *crit.last_counts)} == {device}
    with RecordHostReads() as mode:  # the recorder works: the reference backend reads back
        _device_step(DualSSLLoss(LossConfig(min_pos_voxels=3, min_neg_voxels=3), SPACING, backend="reference"),
                     image, label, outputs)
    assert "numpy" in mode.calls and "nonzero" in mode.calls


def test_the_device_step_runs_on_the_meta_device():
    """Meta tensors hold no values: any host read, ``nonzero`` or data-dependent shape would raise."""
    crit = DualSSLLoss(LossConfig(min_pos_voxels=3, min_neg_voxels=3, rec_crop=0.5), SPACING)
    image, label, outputs = _step_inputs("meta")
    corrupted, con, rec = _device_step(crit, image, label, outputs)
    for t in (corrupted.image, corrupted.mask, corrupted.origin, con, rec, *crit.last_counts):
        assert t.device.type == "meta"
    assert corrupted.image.shape == (2, 1, *crop_size(PATCH, 0.5)) and corrupted.mask.dtype == torch.bool
    mask = label[:, 0] > 0.5
    samples = sample_cells(label, ring_kernel=(10, 20), min_pos_voxels=3, min_neg_voxels=3)
    assert samples.index.shape == (20, 4) and samples.index.device.type == "meta"
    assert ring_skeleton_cells(pool_any(mask)).shape == (2, 8, 8, 5)
    with pytest.raises((RuntimeError, NotImplementedError)):  # the reference cannot run there
        DualSSLLoss(LossConfig(), SPACING, backend="reference").contrastive(outputs["embeddings"], label)


# --- optim.compile ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_step_fit_with_compile_gives_a_finite_loss(phantom_root, tmp_path):
    """``optim.compile``: the training forwards run through torch.compile (Inductor's CPU backend needs
    a C++ compiler); the eager ``trainer.net`` shares the weights and serves validation. Restoration is
    off: its crop is a second input size, a second graph to compile, which doubles a cold compile here
    (111 s against 65 s on 2 cores); benchmarks/step_cost.py --compile measures the full dual step."""
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile's CPU backend (Inductor) needs a C++ compiler (g++, c++ or clang++) on PATH")
    from dualssl.config import Config
    from dualssl.engine import Trainer

    cfg = Config().with_overrides({"model.widths": "8,16,32,64", "data.spacing": "3,3,4", "data.patch_size": "32,32,16",
                                   "data.batch_size": 1, "data.samples_per_volume": 1, "optim.epochs": 1,
                                   "optim.steps_per_epoch": 1, "optim.compile": True, "eval.sw_batch_size": 4,
                                   "loss.lambda_rec": 0.0})
    cfg.data.root, cfg.data.source_sites = str(phantom_root), ["pv_standard"]
    cfg.data.cache_dir = str(tmp_path / "cache")
    trainer = Trainer(cfg.validate())
    trainer.progress = False
    trainer.setup()
    assert trainer.model is not trainer.net and getattr(trainer.model, "_orig_mod", None) is trainer.net
    metrics = trainer.train_epoch(0)
    assert metrics["steps"] == 1 and metrics["nonfinite_steps"] == 0
    assert all(math.isfinite(metrics[k]) for k in ("loss", "loss_seg", "loss_con"))
