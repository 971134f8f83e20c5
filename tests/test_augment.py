"""Domain-generalisation augmentations (dualssl/data/augment): range, label alignment,
reproducibility, the maths checked against independent numpy/scipy code, and the hook in
``train_transforms``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from dualssl.config import DataConfig
from dualssl.data.augment import STRATEGIES, BigAugd, GINd, RandConvd, domain_augmentation
from dualssl.data.augment.bigaug import SPATIAL
from dualssl.data.augment.gin import LEAKY_SLOPE
from dualssl.data.transforms import train_transforms

SHAPE = (32, 32, 24)


def _patch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A smooth random image in [0.1, 0.9] and an off-centre ellipsoid label, both ``(1, *SHAPE)``."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    image = 0.1 + 0.8 * (image - image.min()) / (image.max() - image.min())
    x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    label = ((x - 20) / 7.0) ** 2 + ((y - 12) / 4.0) ** 2 + ((z - 9) / 5.0) ** 2 <= 1
    return {"image": torch.from_numpy(image[None].astype(np.float32)),
            "label": torch.from_numpy(label[None].astype(np.float32))}


def _run(transform, data: dict, seed: int) -> dict:
    transform.set_random_state(seed)
    return transform({k: v.clone() for k, v in data.items()})


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_changes_the_image_in_range_and_keeps_the_label(name):
    data = _patch()
    changed = 0
    for seed in range(4):
        out = _run(domain_augmentation(name), data, seed)
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert image.shape == data["image"].shape and image.dtype == torch.float32
        assert bool(torch.isfinite(image).all()) and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        changed += float((image - data["image"]).abs().max()) > 0.05
        if name in ("randconv", "gin"):
            assert torch.equal(label, data["label"])          # intensity only: bit-identical
        else:
            assert set(torch.unique(label).tolist()) <= {0.0, 1.0}   # nearest: still a mask
    assert changed >= 3 if name == "bigaug" else changed == 4


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_is_reproducible_under_set_random_state(name):
    data = _patch()
    a, b = _run(domain_augmentation(name), data, 7), _run(domain_augmentation(name), data, 7)
    c = _run(domain_augmentation(name), data, 8)
    assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
    assert not torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(c["image"]))


def test_bigaug_spatial_stages_move_image_and_label_together():
    data = _patch()
    data["image"] = 0.1 + 0.8 * data["label"]                 # the intensity encodes the label
    spatial_only = {k: (1.0 if k in SPATIAL else 0.0) for k in BigAugd().probs}
    moved = 0
    for seed in range(3):
        out = _run(BigAugd(probs=spatial_only), data, seed)
        image = torch.as_tensor(out["image"]).numpy()[0] > 0.5
        label = torch.as_tensor(out["label"]).numpy()[0] > 0.5
        assert _dice(image, label) > 0.9                       # two resamplings: borders differ a little
        moved += _dice(image, data["label"].numpy()[0] > 0.5) < 0.85    # ...but the blob did move
    assert moved == 3


def test_bigaug_rejects_an_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage.*'blurr'.*sharpen"):
        BigAugd(probs={"blurr": 1.0})


def test_randconv_matches_scipy_correlation_and_its_weight_law():
    data = _patch()
    t = RandConvd(kernel_sizes=(3,), mix=False)
    out = _run(t, data, 3)["image"].numpy()[0]
    ref = ndimage.correlate(data["image"].numpy()[0].astype(np.float64), t.kernel.astype(np.float64), mode="nearest")
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # weights N(0, 1/k^3): over 300 draws of 3x3x3 kernels, std 1/sqrt(27) = 0.19245
    t.set_random_state(0)
    weights = []
    for _ in range(300):
        t.randomize()
        weights.append(t.kernel.ravel())
    assert np.std(np.concatenate(weights)) == pytest.approx(27 ** -0.5, rel=0.03)
    # 1x1x1 kernel: the min-max rescaled input, inverted when the weight is negative
    one = RandConvd(kernel_sizes=(1,), mix=False)
    x = data["image"].numpy()[0]
    lin = (x - x.min()) / (x.max() - x.min())
    for seed in range(4):
        y = _run(one, data, seed)["image"].numpy()[0]
        np.testing.assert_allclose(y, lin if one.kernel.item() > 0 else 1 - lin, atol=1e-5)


def test_gin_matches_a_numpy_network_and_blends_smoothly():
    data = _patch()
    t = GINd(n_layers=3, channels=2, kernel_sizes=(1,), ipa=False)
    out = _run(t, data, 5)["image"].numpy()[0]
    # 1x1x1 kernels: each layer is an affine map of the channel vector at every voxel
    h = data["image"].numpy()[0][None].astype(np.float64)                         # (1, X, Y, Z)
    for i, (w, b) in enumerate(t.nets[0]):
        h = np.einsum("oi,ixyz->oxyz", w[:, :, 0, 0, 0], h) + b[:, None, None, None]
        if i < len(t.nets[0]) - 1:
            h = np.where(h > 0, h, LEAKY_SLOPE * h)
    net = (h[0] - h[0].min()) / (h[0].max() - h[0].min())
    alpha = t.alphas[0]
    np.testing.assert_allclose(out, alpha * net + (1 - alpha) * data["image"].numpy()[0], atol=1e-5)

    ipa = GINd()
    _run(ipa, data, 1)
    blend = ipa.blend_map(SHAPE).numpy()
    assert blend.min() >= 0 and blend.max() <= 1 and blend.std() > 0.05
    zoom = [s / ipa.control_points for s in SHAPE]
    np.testing.assert_allclose(blend, np.clip(ndimage.zoom(ipa.lattice, zoom, order=3, mode="nearest", grid_mode=False),
                                              0, 1), atol=1e-5)
    # smooth: a step between neighbours is a fraction of the range (about 1 per 8 voxels here, not voxel noise)
    assert max(np.abs(np.diff(blend, axis=a)).max() for a in range(3)) < 0.25


def _volume() -> dict:
    """A preprocessed-like volume (MetaTensors, as the cache gives them) of 48 x 48 x 32 voxels."""
    data = _patch(1)
    image = torch.nn.functional.pad(data["image"], (4, 4, 8, 8, 8, 8), value=0.3)
    label = torch.nn.functional.pad(data["label"], (4, 4, 8, 8, 8, 8)).to(torch.uint8)
    return {"image": MetaTensor(image), "label": MetaTensor(label), "case_id": "c0", "site": "a"}


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_train_transforms_applies_the_configured_strategy(name, augment):
    cfg = dict(patch_size=(32, 32, 24), samples_per_volume=2, augment=augment)
    plain_pipe = train_transforms(DataConfig(**cfg))
    aug_pipe = train_transforms(DataConfig(**cfg, domain_aug=name))
    assert not any(isinstance(t, tuple(type(f()) for f in STRATEGIES.values())) for t in plain_pipe.transforms)
    assert sum(isinstance(t, type(domain_augmentation(name))) for t in aug_pipe.transforms) == 1
    plain_pipe.set_random_state(11)
    aug_pipe.set_random_state(11)
    volume = _volume()
    plain_out, aug_out = plain_pipe(dict(volume)), aug_pipe(dict(volume))
    assert len(aug_out) == 2
    differs = 0
    for p, a in zip(plain_out, aug_out):
        assert a["image"].shape == (1, 32, 32, 24) and float(a["image"].max()) <= 1.0
        differs += not torch.allclose(p["image"], a["image"])
        if name != "bigaug":      # same seeds for the earlier stages: the same patches, labels untouched
            assert torch.equal(p["label"], a["label"])
    assert differs >= 1
