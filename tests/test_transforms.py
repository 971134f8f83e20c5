"""Preprocessing, patches, inversion to the input's geometry, the shared cache and build_data."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dualssl.config import DataConfig
from dualssl.data.cache import cache_dir_for, cached_dataset, preprocessing_hash
from dualssl.data.datalist import DatasetError, load_datalist
from dualssl.data.loaders import build_data
from dualssl.data.transforms import (
    inference_transforms,
    invert_to_input,
    original_affine,
    preprocess_transforms,
    train_transforms,
)
from test_datalist import affine_of, ellipsoid, write_case, write_msd

SPACING = (1.5, 1.5, 2.0)
PATCH = (16, 16, 16)


def cfg_for(root: Path | str = "", **kw) -> DataConfig:
    base = dict(root=str(root), spacing=SPACING, patch_size=PATCH, samples_per_volume=2, batch_size=2,
                source_sites=["a"], val_fraction=0.34)
    return DataConfig(**{**base, **kw})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_preprocess_contract_ras_spacing_window_and_merged_labels(tmp_path):
    lab = write_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", axes="LPS")
    cfg = cfg_for()
    d = preprocess_transforms(cfg)({"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")})
    image, label = d["image"], d["label"]
    assert image.dtype == torch.float32 and label.dtype == torch.uint8
    assert image.shape == label.shape and image.shape[0] == 1
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(label.unique().tolist()) == {0, 1}  # tumour 2 merged into 1
    affine = image.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), SPACING, rtol=1e-5)
    # pancreas volume is kept (nearest resampling), and its 100 HU reads (100 - low) / (high - low)
    volume_in = float((lab > 0).sum()) * 1.2 * 1.2 * 2.5
    volume_out = float(label.sum()) * np.prod(SPACING)
    assert abs(volume_out - volume_in) / volume_in < 0.1
    low, high = cfg.hu_window
    inside = image[label > 0]
    assert abs(float(inside.median()) - (100 - low) / (high - low)) < 0.02
    # the body crop removed most of the air but kept the whole pancreas
    assert float((image == 0).float().mean()) < 0.5
    assert float(label.sum()) > 0


@pytest.mark.parametrize("axes", ["LPS", "LAI"])
def test_label_through_preprocess_and_invert_matches_the_original(tmp_path, axes):
    shape, spacing = (72, 64, 28), (0.7, 0.8, 2.5)  # a 13 ml "pancreas" of 15 x 12 x 17 mm radii
    img = np.full(shape, -1000, np.int16)
    img[ellipsoid(shape, (36, 32, 14), (33, 29, 1e3))] = 40
    lab = ellipsoid(shape, (38, 30, 14), (22, 15, 7)).astype(np.uint8)
    img[lab > 0] = 100
    aff = affine_of(spacing, axes)
    nib.save(nib.Nifti1Image(img, aff), str(tmp_path / "i.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "l.nii.gz"))
    cfg = cfg_for()
    d = preprocess_transforms(cfg)({"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")})
    back = invert_to_input(d["label"], d, cfg)
    assert back.shape == shape
    np.testing.assert_allclose(original_affine(d), aff, atol=1e-5)
    assert dice(back > 0.5, lab > 0) > 0.95
    # the same prediction inverted through the image-only inference pipeline lands in the same place
    di = inference_transforms(cfg)({"image": str(tmp_path / "i.nii.gz")})
    assert set(di) >= {"image"} and "label" not in di and di["image"].shape == d["image"].shape
    np.testing.assert_array_equal(invert_to_input(d["label"], di, cfg), back)


def test_train_patches_pad_small_volumes_and_centre_on_the_pancreas(tmp_path):
    write_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", shape=(20, 18, 6))  # smaller than the patch
    data = {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz"), "case_id": "c", "site": "a"}
    for augment in (False, True):
        cfg = cfg_for(patch_size=(32, 32, 16), pos_fraction=1.0, samples_per_volume=3, augment=augment)
        pre = preprocess_transforms(cfg)(dict(data))
        assert any(s < p for s, p in zip(pre["image"].shape[1:], cfg.patch_size))
        tf = train_transforms(cfg)
        tf.set_random_state(seed=0)
        patches = tf(pre)
        assert len(patches) == 3
        for p in patches:
            assert p["image"].shape == (1, 32, 32, 16) and p["image"].dtype == torch.float32
            assert p["label"].shape == (1, 32, 32, 16) and p["label"].dtype == torch.float32
            assert set(p["label"].unique().tolist()) <= {0.0, 1.0} and float(p["label"].sum()) > 0
            assert type(p["image"]) is torch.Tensor and p["case_id"] == "c"


def test_augmentation_changes_intensities_only_when_asked(tmp_path):
    write_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz", shape=(48, 44, 16))
    data = {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}
    pre = preprocess_transforms(cfg_for())(data)
    volume_values = set(np.round(pre["image"].numpy().ravel(), 5).tolist())
    outside = {}
    for augment in (False, True):
        tf = train_transforms(cfg_for(augment=augment, samples_per_volume=8))
        tf.set_random_state(seed=3)
        patches = tf(pre)
        values = np.concatenate([np.round(p["image"].numpy().ravel(), 5) for p in patches])
        outside[augment] = float(np.mean([v not in volume_values for v in values]))
    assert outside[False] == 0.0 and outside[True] > 0.2


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def test_bad_input_raises_errors_that_name_the_file(tmp_path):
    write_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    img = nib.load(tmp_path / "i.nii.gz")
    arr, aff = np.asanyarray(img.dataobj), img.affine
    moved = aff.copy()
    moved[:3, 3] += 5.0
    image, label = str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes((tmp_path / "i.nii.gz").read_bytes()[:600])
    cases = [  # (image, label, expected message)
        (image, _save(tmp_path / "short.nii.gz", np.zeros(arr.shape[:2] + (3,), np.uint8), aff),
         r"short\.nii\.gz: label shape"),
        (image, _save(tmp_path / "moved.nii.gz", np.zeros(arr.shape, np.uint8), moved),
         r"moved\.nii\.gz: label affine differs"),
        (_save(tmp_path / "nan.nii.gz", np.where(arr > 50, np.nan, arr).astype(np.float32), aff), label,
         r"nan\.nii\.gz: \d+ NaN or inf"),
        (image, _save(tmp_path / "half.nii.gz", np.full(arr.shape, 0.5, np.float32), aff),
         r"half\.nii\.gz: label values must be non-negative integers"),
        (str(tmp_path / "nope.nii.gz"), label, r"nope\.nii\.gz: image file not found"),
        (str(truncated), label, r"cut\.nii\.gz: cannot read image as NIfTI"),
    ]
    pre = preprocess_transforms(cfg_for())
    for bad_image, bad_label, pattern in cases:
        with pytest.raises(DatasetError, match=pattern):
            pre({"image": bad_image, "label": bad_label})
    # write_case labels hold 1 (pancreas) and 2 (tumour): a dataset declaring only 0/1 rejects them
    with pytest.raises(DatasetError, match=r"l\.nii\.gz: label values \[2\] are not declared \(declared: \[0, 1\]\)"):
        preprocess_transforms(cfg_for(), label_values=(0, 1))({"image": image, "label": label})


def test_empty_label_warns(tmp_path):
    write_case(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")
    aff = nib.load(tmp_path / "i.nii.gz").affine
    empty = _save(tmp_path / "empty.nii.gz", np.zeros(nib.load(tmp_path / "i.nii.gz").shape, np.uint8), aff)
    with pytest.warns(UserWarning, match=r"empty\.nii\.gz: label is empty"):
        out = preprocess_transforms(cfg_for())({"image": str(tmp_path / "i.nii.gz"), "label": empty})
    assert float(out["label"].sum()) == 0


def _fill_cache(root: str, cache: str) -> int:
    cfg = cfg_for(root, cache_dir=cache)
    ds = cached_dataset(load_datalist(root), cfg)
    return sum(int(ds[i]["label"].sum()) for i in range(len(ds)))


def test_cache_is_shared_by_concurrent_writers_and_follows_file_changes(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 3})
    cache = tmp_path / "cache"
    # two "trials" (own dataset objects; threads, as processes cost seconds of imports) write the
    # same items into the same cache at the same time
    with ThreadPoolExecutor(2) as pool:
        sums = list(pool.map(_fill_cache, [str(root)] * 2, [str(cache)] * 2))
    cfg = cfg_for(root, cache_dir=str(cache))
    folder = cache / preprocessing_hash(cfg)
    assert cache_dir_for(cfg) == folder
    files = sorted(folder.glob("*.pt"))
    assert len(files) == 3 and not list(folder.glob("*.tmp")) and sums[0] == sums[1]
    mtimes = [f.stat().st_mtime_ns for f in files]
    cases = load_datalist(root)
    ds = cached_dataset(cases, cfg)
    fresh = preprocess_transforms(cfg)(cases[0].as_dict())
    cached = ds[0]
    assert torch.equal(cached["image"], fresh["image"]) and torch.equal(cached["label"], fresh["label"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read, not rewritten
    # a cached volume inverts like a fresh one (meta data survives the cache)
    np.testing.assert_array_equal(invert_to_input(cached["label"], cached, cfg),
                                  invert_to_input(fresh["label"], fresh, cfg))
    # another preprocessing config gets its own folder; an edited scan gets a new entry
    assert preprocessing_hash(cfg_for(root, spacing=(2.0, 2.0, 2.0))) != preprocessing_hash(cfg)
    os.utime(cases[0].image, ns=(1, 1))
    ds[0]
    assert len(list(folder.glob("*.pt"))) == 4


def test_build_data_batches_and_fixed_validation_patches(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 4, "b": 1})
    cfg = cfg_for(root, val_fraction=0.25, batch_size=2, samples_per_volume=2)
    torch.manual_seed(0)
    bundle = build_data(cfg)
    assert len(bundle.split.train) == 3 and len(bundle.split.val) == 1 and list(bundle.split.test) == ["b"]
    assert cache_dir_for(cfg).parent == root / ".dualssl_cache" and any(cache_dir_for(cfg).glob("*.pt")) is False
    batches = list(bundle.train_loader)
    assert [b["image"].shape[0] for b in batches] == [4, 2]  # 2 volumes x 2 patches, then 1 x 2
    for b in batches:
        assert b["image"].shape[1:] == (1, *PATCH) and b["image"].dtype == torch.float32
        assert b["label"].shape == b["image"].shape and set(b["label"].unique().tolist()) <= {0.0, 1.0}
        assert set(b["site"]) == {"a"}
    epoch1 = [b["image"].clone() for b in bundle.val_patch_loader]
    epoch2 = [b["image"].clone() for b in bundle.val_patch_loader]
    assert len(epoch1) == 1 and epoch1[0].shape == (2, 1, *PATCH)
    assert all(torch.equal(x, y) for x, y in zip(epoch1, epoch2))
    volume = bundle.val_volumes[0]
    assert volume["case_id"] == bundle.split.val[0].case_id and volume["image"].ndim == 4
    assert len(list(cache_dir_for(cfg).glob("*.pt"))) == 4


def test_phantom_dataset_goes_through_build_data(phantom_root, tmp_path):
    cfg = cfg_for(phantom_root, source_sites=["pv_standard"], val_fraction=0.25, patch_size=(32, 32, 16),
                  pos_fraction=1.0, cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    bundle = build_data(cfg)
    assert set(bundle.split.test) == {"native_thick", "cone_beam"}
    batch = next(iter(bundle.train_loader))
    assert batch["image"].shape == (4, 1, 32, 32, 16) and float(batch["label"].sum()) > 0
