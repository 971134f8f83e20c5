"""Corruptions: the achieved corruption ratio, blob selection, each named corruption, the probability table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dualssl.losses.corruptions import (CORRUPTION_TABLE, OUT_PAINTING_SHARE, Voxels, corrupt_batch,
                                        draw_corruptions, in_painting, local_pixel_shuffle, nonlinear_intensity,
                                        out_painting, select_voxels)
from dualssl.losses.restoration import CHANGE_EPS, corrupt_region, crop_size, force_change
from dualssl.losses.uncertainty import boundary_band

SPACING = (1.5, 1.5, 2.0)


def blob_batch(shape=(48, 48, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ellipsoid labels of different size and a textured image."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    labels = []
    for radii in ((12, 8, 6), (8, 14, 5)):
        labels.append(((((grid - np.array(shape) / 2) / radii) ** 2).sum(-1) <= 1))
    label = torch.from_numpy(np.stack(labels)[:, None].astype(np.float32))
    torch.manual_seed(0)
    image = (0.4 + 0.3 * label + 0.1 * torch.rand_like(label)).clamp(0, 1)
    return image, label


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_realised_ratio_counts_the_voxels_that_actually_changed(ratio):
    """r = changed band voxels / band voxels, the change measured on the images themselves (the old
    code returned the chosen voxels, ~5 % of which the Models Genesis chain leaves unchanged)."""
    torch.manual_seed(int(ratio * 10))
    image, label = blob_batch()
    band = boundary_band(label, SPACING, 4.0)
    out = corrupt_region(image, label, SPACING, ratio=ratio, band_mm=4.0, crop=1.0)
    changed = (out.image - image).abs() > CHANGE_EPS  # independent of out.mask
    assert torch.equal(out.mask, changed)  # the mask is exactly the changed voxels
    assert not (changed & ~band).any()  # only band voxels change
    for b in range(2):
        realised = changed[b].sum().item() / band[b].sum().item()
        assert abs(realised - ratio) <= 0.002, (b, realised)
        assert out.region_voxels[b].item() == band[b].sum().item()
    assert out.realised_ratio.item() == pytest.approx(changed.sum().item() / band.sum().item())


def test_unchanged_chosen_voxels_are_forced_to_change():
    clean = torch.full((1, 1, 4, 4, 4), 0.3)
    corrupted = clean.clone()
    corrupted[0, 0, 0, 0, :2] = 0.9  # two voxels the chain changed; the rest of the row it left alone
    chosen = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    chosen[0, 0, 0, 0] = True
    torch.manual_seed(0)
    out = force_change(clean, corrupted, chosen)
    assert torch.equal(out[0, 0, 0, 0, :2], torch.tensor([0.9, 0.9]))  # changed ones keep their value
    assert ((out - clean).abs()[0, 0, 0, 0, 2:] > CHANGE_EPS).all()
    assert torch.equal(out[~chosen], clean[~chosen]) and 0 <= out.min() and out.max() < 1


@pytest.mark.parametrize("fraction, expected", [(0.5, (24, 24, 16)), (0.3, (16, 16, 8)), (0.01, (8, 8, 8)),
                                                (1.0, (48, 48, 32))])
def test_restoration_crop_sits_on_the_band_inside_the_patch(fraction, expected):
    torch.manual_seed(0)
    image, label = blob_batch()
    assert crop_size((48, 48, 32), fraction) == expected
    out = corrupt_region(image, label, SPACING, ratio=0.5, band_mm=4.0, crop=fraction)
    assert tuple(out.image.shape) == (2, 1, *expected)
    band = boundary_band(label, SPACING, 4.0)
    for b, (x, y, z) in enumerate(out.origin.tolist()):
        window = (slice(x, x + expected[0]), slice(y, y + expected[1]), slice(z, z + expected[2]))
        assert x + expected[0] <= 48 and y + expected[1] <= 48 and z + expected[2] <= 32
        assert torch.equal(out.clean[b], image[b][(slice(None), *window)])  # the clean crop, bit for bit
        assert out.region_voxels[b].item() == band[b][(slice(None), *window)].sum().item() > 0
        keep = ~out.mask[b].expand_as(out.clean[b])
        assert torch.equal(out.image[b][keep], out.clean[b][keep])
    assert abs(out.realised_ratio.item() - 0.5) <= 0.002


def test_selection_comes_in_blobs():
    torch.manual_seed(0)
    region = torch.ones(1, 1, 32, 32, 32, dtype=torch.bool)
    selected = select_voxels(region, 0.3)[0, 0].numpy()
    random = (torch.rand(32, 32, 32) < 0.3).numpy()
    neighbours = lambda m: ndimage.convolve(m.astype(float), np.ones((3, 3, 3)) / 26, mode="nearest")  # noqa: E731
    # a selected voxel's neighbours are mostly selected too; for a random choice only ~30 % are
    assert (neighbours(selected) - selected / 26)[selected].mean() > 0.6
    assert (neighbours(random) - random / 26)[random].mean() < 0.4
    assert ndimage.label(selected)[1] < 0.05 * ndimage.label(random)[1]


def test_local_pixel_shuffle_takes_values_from_the_same_block():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 8, 8, 8)
    mask = torch.rand(2, 1, 8, 8, 8) > 0.5
    vox = Voxels.from_mask(mask)
    values = local_pixel_shuffle(image, vox, max_block=2)[:, 0]
    for v, b, x, y, z in zip(values, vox.b, vox.x, vox.y, vox.z):
        block = image[b, 0, x - x % 2:x - x % 2 + 2, y - y % 2:y - y % 2 + 2, z - z % 2:z - z % 2 + 2]
        assert (block == v).any()
    assert (values != vox.read(image)[:, 0]).float().mean() > 0.6  # 7 of 8 draws pick another voxel


def test_nonlinear_intensity_is_a_monotone_curve_per_sample():
    torch.manual_seed(3)
    b = torch.arange(2).repeat_interleave(101)
    vox = Voxels(b, torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b), (2, 1, 1, 1))
    ramp = torch.linspace(0, 1, 101).repeat(2)[:, None]
    out = nonlinear_intensity(ramp, vox)[:, 0]
    assert 0 <= out.min() and out.max() <= 1
    for curve in out.reshape(2, 101):
        steps = curve.diff()
        assert (steps >= -1e-6).all() or (steps <= 1e-6).all()
        assert {round(curve[0].item(), 3), round(curve[-1].item(), 3)} == {0.0, 1.0}
        assert (curve - torch.linspace(0, 1, 101)).abs().max() > 0.01  # not the identity


def test_painting_fills_boxes_with_noise():
    torch.manual_seed(0)
    image = torch.full((4, 1, 24, 24, 24), 0.5)
    vox = Voxels.from_mask(torch.ones(4, 1, 24, 24, 24, dtype=torch.bool))
    values = vox.read(image)
    inside = (in_painting(values, vox) != 0.5).reshape(4, 24, 24, 24).float().mean(dim=(1, 2, 3))
    outside = (out_painting(values, vox) != 0.5).reshape(4, 24, 24, 24).float().mean(dim=(1, 2, 3))
    # in-painting: up to 5 boxes of sides 1/6..1/3 -> at most 5/27 of the patch; out-painting keeps <= 5 boxes
    assert (inside > 0).all() and (inside <= 5 / 27 + 1e-6).all()
    assert (outside > 0.3).all() and (outside < 1).all()


def test_the_probability_table_is_followed():
    torch.manual_seed(0)
    n = 20000
    drawn = draw_corruptions(n, torch.empty(0))
    freq = {k: v.float().mean().item() for k, v in drawn.items()}
    assert freq["local_pixel_shuffle"] == pytest.approx(CORRUPTION_TABLE["local_pixel_shuffle"], abs=0.02)
    assert freq["nonlinear_intensity"] == pytest.approx(CORRUPTION_TABLE["nonlinear_intensity"] + 0.005, abs=0.02)
    paint = CORRUPTION_TABLE["painting"]
    assert freq["out_painting"] == pytest.approx(paint * OUT_PAINTING_SHARE, abs=0.02)
    assert freq["in_painting"] == pytest.approx(paint * (1 - OUT_PAINTING_SHARE), abs=0.02)
    assert not (drawn["in_painting"] & drawn["out_painting"]).any()
    assert (drawn["local_pixel_shuffle"] | drawn["nonlinear_intensity"] | drawn["in_painting"]
            | drawn["out_painting"]).all()


def test_each_sample_gets_only_its_drawn_corruptions():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 16, 16, 16)
    mask = torch.ones(2, 1, 16, 16, 16, dtype=torch.bool)
    none = torch.zeros(2, dtype=torch.bool)
    drawn = {"local_pixel_shuffle": none, "nonlinear_intensity": torch.tensor([True, False]),
             "in_painting": none, "out_painting": none}
    out = corrupt_batch(image, mask, drawn)
    assert torch.equal(out[1], image[1]) and (out[0] != image[0]).float().mean() > 0.9
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        corrupt_batch(image, mask[:, :, :8])


def test_whole_volume_of_any_size_corrupts_in_place_when_crop_is_one():
    """``crop=1`` keeps the input's size even when it is no multiple of 8 (whole volumes, the shortcut probe)."""
    torch.manual_seed(0)
    image, label = blob_batch((41, 37, 25))
    assert crop_size((41, 37, 25), 1.0) == (41, 37, 25)
    out = corrupt_region(image, label, SPACING, ratio=0.5, band_mm=4.0, crop=1.0)
    assert out.image.shape == image.shape and torch.equal(out.clean, image)
