"""A study's evaluation reads each case's preprocessed image from the cache its one pass wrote
(``dualssl.data.cache.CachedInference``): the cached image, its affine and so the predicted mask and
probabilities on the scan's own grid equal what the raw file gives through ``inference_transforms``;
an uncached case falls back to the file; the reader writes nothing; a Predictor without it (dualssl
evaluate, exported models) is unchanged."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from dualssl.data.cache import CachedInference, cache_file, ensure_cached
from dualssl.data.datalist import load_datalist
from dualssl.data.transforms import inference_transforms
from dualssl.evaluation.inference import Predictor
from dualssl.evaluation.run import evaluate_cases
from dualssl.models import SegmentationNet, build_model
from dualssl.recipes import recipe_config


@pytest.fixture(scope="module")
def setup(phantom_root, tmp_path_factory):
    cfg = recipe_config("smoke")
    cfg.data.root = str(phantom_root)
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    cfg.eval.tta_flips = False
    # coarse voxels: a few windows a scan (what is checked, cache == file, holds at any spacing)
    cfg.data.spacing = (6.0, 6.0, 8.0)
    cases = load_datalist(phantom_root)
    # one case of each site, the way the study's one pass writes them (image and label together)
    picked = [next(c for c in cases if c.site == site) for site in sorted({c.site for c in cases})]
    from dualssl.data.cache import cache_dir_for

    folder = cache_dir_for(cfg.data)
    for case in picked[:-1]:
        assert ensure_cached(case, cfg.data, folder)
    torch.manual_seed(0)
    net = SegmentationNet(build_model(cfg.model)).eval()
    _small_foreground(net, cfg, picked[0])
    return cfg, cases, picked, folder, net


def _small_foreground(net: SegmentationNet, cfg, case, fraction: float = 0.01) -> None:
    """Shift the last layer's foreground bias so that about ``fraction`` of ``case``'s voxels are
    foreground: an untrained net marks a third of the scan, whose surface distances dominate the cost
    of ``evaluate_cases``; a small, non-empty mask still tells a wrong cached image from the right one."""
    image = inference_transforms(cfg.data)({"image": case.image})["image"].as_tensor()
    probs = Predictor(net, cfg, device="cpu").predict_probs(image)  # (K, X, Y, Z)
    margin = torch.log(probs[1].clamp_min(1e-12)) - torch.log(probs[0].clamp_min(1e-12))
    with torch.no_grad():
        net.seg_head.conv.bias[1] -= float(torch.quantile(margin.flatten().double(), 1.0 - fraction))


def _listing(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cached_image_equals_inference_transforms_of_the_file(setup):
    cfg, cases, picked, folder, _ = setup
    reader = CachedInference(cfg.data, cases)
    for case in picked[:-1]:
        assert reader.cached_path(case.image) == cache_file(case, folder)
        cached = reader({"image": case.image})["image"]
        raw = inference_transforms(cfg.data)({"image": case.image})["image"]
        assert tuple(cached.shape) == tuple(raw.shape) and cached.dtype == raw.dtype == torch.float32
        assert torch.equal(cached.as_tensor(), raw.as_tensor()), case.image
        assert torch.allclose(cached.affine.double(), raw.affine.double(), atol=1e-6), case.image
    assert (reader.hits, reader.misses) == (len(picked) - 1, 0)


def test_prediction_from_the_cache_equals_prediction_from_the_file(setup, tmp_path):
    cfg, cases, picked, folder, net = setup
    before = _listing(folder)
    reader = CachedInference(cfg.data, cases)
    cached = Predictor(net, cfg, device="cpu", preprocess=reader)
    plain = Predictor(net, cfg, device="cpu")
    for case in picked:
        mask_c, prob_c = cached.segment_file(case.image, probabilities=True)
        mask_f, prob_f = plain.segment_file(case.image, probabilities=True)
        assert mask_c.shape == nib.load(case.image).shape and np.allclose(mask_c.affine, mask_f.affine)
        np.testing.assert_allclose(np.asanyarray(prob_c.dataobj), np.asanyarray(prob_f.dataobj), atol=1e-5)
        assert np.array_equal(np.asanyarray(mask_c.dataobj), np.asanyarray(mask_f.dataobj)), case.image
        assert np.asanyarray(mask_f.dataobj).any(), case.image  # a mask to compare, not two empty ones
    # the last picked case was never cached: it came from the file
    assert (reader.hits, reader.misses) == (len(picked) - 1, 1)
    assert _listing(folder) == before  # the reader wrote nothing

    # evaluate_cases records how many cases came from the cache; a plain Predictor records nothing
    summary = evaluate_cases(Predictor(net, cfg, device="cpu", preprocess=CachedInference(cfg.data, cases)),
                             picked, cfg, tmp_path / "cached", cfg.data.source_sites)
    assert summary["settings"]["preprocessed_from_cache"] == len(picked) - 1
    summary_plain = evaluate_cases(plain, picked, cfg, tmp_path / "plain", cfg.data.source_sites)
    assert "preprocessed_from_cache" not in summary_plain["settings"]
    for key in ("dice_mean", "n"):
        assert {s: v.get(key) for s, v in summary["per_site"].items()} == \
            {s: v.get(key) for s, v in summary_plain["per_site"].items()}
    assert _listing(folder) == before


def test_an_edited_scan_is_not_served_stale(setup, tmp_path):
    cfg, cases, picked, folder, _ = setup
    import shutil

    from dualssl.data.datalist import Case

    case = picked[0]
    copy = Case(case.case_id, str(tmp_path / "ct.nii.gz"), case.label, case.site)
    shutil.copy(case.image, copy.image)
    ensure_cached(copy, cfg.data, folder)
    reader = CachedInference(cfg.data, [copy])
    assert reader.cached_path(copy.image) is not None
    img = nib.load(copy.image)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), copy.image)
    assert reader.cached_path(copy.image) is None  # new size/mtime: a new key, read from the file
    out = reader({"image": copy.image})["image"]
    assert torch.equal(out.as_tensor(), inference_transforms(cfg.data)({"image": copy.image})["image"].as_tensor())
    assert (reader.hits, reader.misses) == (0, 1)
