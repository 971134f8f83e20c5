"""The procedural phantom: MSD layout, labels, organ HU per site, anatomy, orientation, determinism.

Written files come from the session's ``phantom_root`` (three sites); each of them is re-rendered
from its per-case seed to know its organ map. The four other sites are rendered here at the same
scale and written through the same NIfTI writer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dualssl.data.phantom import (SITE_PROFILES, Tissue, case_seed, core_mask, generate_dataset, nifti_bytes,
                                  render_case)
from dualssl.data.phantom.measure import FAT, erosion_for

CHECKED_TISSUES = {"pancreas": Tissue.PANCREAS, "liver": Tissue.LIVER, "spleen": Tissue.SPLEEN,
                   "aorta": Tissue.AORTA, "fat": FAT}


def _dataset(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


@pytest.fixture(scope="module")
def cases(phantom_root: Path, tmp_path_factory) -> list[dict]:
    """One written case per fixture site and one written case of every other site, each with the
    organ map of its re-rendered twin: dicts of site, image (nib), label (nib), rendered case."""
    ds = _dataset(phantom_root)
    seed, scale = ds["phantom"]["seed"], ds["phantom"]["scale"]
    out, seen = [], {}
    for entry in ds["training"]:
        site = entry["site"]
        index = seen.setdefault(site, 0)
        seen[site] += 1
        if index >= 1:
            continue
        out.append({"site": site, "image": nib.load(phantom_root / entry["image"]),
                    "label": nib.load(phantom_root / entry["label"]),
                    "case": render_case(site, case_seed(seed, site, index), scale)})
    folder = tmp_path_factory.mktemp("other_sites")
    for site in SITE_PROFILES:
        if site in seen:
            continue
        case = render_case(site, case_seed(seed, site, 0), scale)
        (folder / f"{site}.nii.gz").write_bytes(nifti_bytes(case.image, case.affine))
        (folder / f"{site}_label.nii.gz").write_bytes(nifti_bytes(case.label, case.affine))
        out.append({"site": site, "image": nib.load(folder / f"{site}.nii.gz"),
                    "label": nib.load(folder / f"{site}_label.nii.gz"), "case": case})
    assert {c["site"] for c in out} == set(SITE_PROFILES)
    return out


def test_dataset_json_is_msd_with_sites(phantom_root):
    ds = _dataset(phantom_root)
    assert ds["labels"] == {"0": "background", "1": "pancreas"}
    assert ds["modality"] == {"0": "CT"}
    assert ds["numTraining"] == len(ds["training"]) > 0
    assert set(ds["sites"]) == {e["site"] for e in ds["training"]} <= set(SITE_PROFILES)
    for entry in ds["training"]:
        assert set(entry) == {"image", "label", "site"}
        cid = Path(entry["image"]).name.removesuffix(".nii.gz")
        assert re.fullmatch(rf"{entry['site']}_\d{{3}}", cid)
        assert entry["image"] == f"./imagesTr/{cid}.nii.gz" and entry["label"] == f"./labelsTr/{cid}.nii.gz"
        assert (phantom_root / entry["image"]).is_file() and (phantom_root / entry["label"]).is_file()


def test_every_label_is_binary_non_empty_and_on_the_image_grid(phantom_root):
    for entry in _dataset(phantom_root)["training"]:
        image, label = nib.load(phantom_root / entry["image"]), nib.load(phantom_root / entry["label"])
        data = np.asarray(label.dataobj)
        assert set(np.unique(data)) == {0, 1}, entry["label"]
        assert data.shape == image.shape and np.allclose(label.affine, image.affine)
        # small enough for tests and CI: well under 1 MB per case at the test scale
        assert (phantom_root / entry["image"]).stat().st_size < 1_000_000


def test_written_files_match_the_rendered_case(cases):
    for c in cases:
        assert np.array_equal(np.asarray(c["label"].dataobj), c["case"].label), c["site"]
        assert np.array_equal(np.asarray(c["image"].dataobj), c["case"].image), c["site"]


def test_orientation_dtype_and_spacing_per_site(cases):
    for c in cases:
        profile, image, info = SITE_PROFILES[c["site"]], c["image"], c["case"].info
        assert "".join(nib.aff2axcodes(image.affine)) == profile.orientation, c["site"]
        assert image.get_data_dtype() == np.dtype(profile.dtype), c["site"]
        assert nib.aff2axcodes(nib.as_closest_canonical(image).affine) == ("R", "A", "S")
        clinical = [info["clinical_pixel_mm"]] * 2 + [info["clinical_slice_mm"]]
        assert np.allclose(image.header.get_zooms(), np.array(clinical) / info["scale"], rtol=1e-5)
        assert profile.pixel_mm[0] <= info["clinical_pixel_mm"] <= profile.pixel_mm[1]
        assert info["clinical_slice_mm"] in profile.slice_mm


def test_anatomy_sits_where_the_affine_says(cases):
    """In world RAS mm: liver right of the spleen, pancreas in front of the aorta, liver above the
    lower kidney pole. A wrong flip between array and affine would break one of these."""
    for c in cases:
        organs, affine = c["case"].organs, c["image"].affine

        def centroid(tissue):
            idx = np.argwhere(organs == tissue)
            assert len(idx), (c["site"], tissue)
            return nib.affines.apply_affine(affine, idx).mean(0)

        assert centroid(Tissue.LIVER)[0] > centroid(Tissue.SPLEEN)[0] + 50, c["site"]
        assert centroid(Tissue.PANCREAS)[1] > centroid(Tissue.AORTA)[1], c["site"]
        assert centroid(Tissue.LIVER)[2] > centroid(Tissue.KIDNEY)[2], c["site"]


def test_organ_median_hu_within_each_site_profile(cases):
    """Medians of organ cores measured on the written image, against the profile's range
    (phase HU, fat dilution of the pancreas, calibration, cupping)."""
    for c in cases:
        profile, case = SITE_PROFILES[c["site"]], c["case"]
        image = np.asarray(c["image"].dataobj).astype(np.float32)
        for name, tissue in CHECKED_TISSUES.items():
            core = core_mask(case.organs, case.pure, tissue, erosion_for(profile.blur_px))
            assert core.sum() >= 10, (c["site"], name)
            lo, hi = profile.expected_hu(tissue)
            median = float(np.median(image[core]))
            assert lo <= median <= hi, f"{c['site']} {name}: median {median:.0f} outside [{lo:.0f}, {hi:.0f}]"


def test_contrast_phase_orders_pancreas_and_aorta(cases):
    """Pancreatic phase: aorta far above the pancreas; native: both near 40-50 HU."""
    for c in cases:
        case = c["case"]
        image = np.asarray(c["image"].dataobj).astype(np.float32)
        med = {t: float(np.median(image[core_mask(case.organs, case.pure, t, 2)])) for t in
               (Tissue.PANCREAS, Tissue.AORTA)}
        gap = med[Tissue.AORTA] - med[Tissue.PANCREAS]
        phase = SITE_PROFILES[c["site"]].phase
        if phase == "pancreatic":
            assert gap > 100, (c["site"], med)
        elif phase == "native":
            assert abs(gap) < 40, (c["site"], med)


def test_noise_level_follows_the_site(cases):
    """Std in the liver core matches the drawn noise (plus the organ's slow texture)."""
    for c in cases:
        profile, case = SITE_PROFILES[c["site"]], c["case"]
        image = np.asarray(c["image"].dataobj).astype(np.float32)
        core = core_mask(case.organs, case.pure, Tissue.LIVER, 2)
        measured = float(np.std(image[core])) / case.info["hu_scale"]
        drawn = case.info["noise_hu"]
        assert 0.85 * profile.noise_hu[0] <= drawn <= 1.2 * profile.noise_hu[1]
        slack = 1.6 if profile.cupping_hu[1] else 1.3  # cupping and shading spread the cone-beam liver
        assert 0.8 * drawn <= measured <= slack * np.hypot(drawn, 4.0), (c["site"], measured, drawn)


def test_pancreas_lies_along_the_splenic_vein_and_in_the_duodenal_loop(cases):
    for c in cases:
        organs, affine = c["case"].organs, c["image"].affine
        spacing = np.array(c["image"].header.get_zooms()[:3])
        pancreas, vein = organs == Tissue.PANCREAS, organs == Tissue.SPLENIC_VEIN
        dist = ndimage.distance_transform_edt(~pancreas, sampling=spacing)
        # the vein runs along the back of the body and tail: most of it within 8 mm of the pancreas
        assert dist[vein].min() <= spacing.max() + 0.1, c["site"]
        along = vein & (dist <= 8)
        assert along.sum() >= 0.25 * vein.sum(), c["site"]
        near = pancreas & (ndimage.distance_transform_edt(~vein, sampling=spacing) <= 8)
        y_vein = nib.affines.apply_affine(affine, np.argwhere(along))[:, 1].mean()
        y_panc = nib.affines.apply_affine(affine, np.argwhere(near))[:, 1].mean()
        assert y_panc > y_vein, f"{c['site']}: the splenic vein should lie behind the pancreas"
        # the head (rightmost pancreas) touches the duodenum on its right
        duo = ndimage.distance_transform_edt(organs != Tissue.DUODENUM, sampling=spacing)
        world = nib.affines.apply_affine(affine, np.argwhere(pancreas))
        head = np.argwhere(pancreas)[world[:, 0] > np.percentile(world[:, 0], 95)]
        assert np.median(duo[tuple(head.T)]) < 15, c["site"]


def test_pancreas_volumes_within_the_real_msd_range(phantom_root, shared_data):
    folder = shared_data / "labels" / "msd_task07_pancreas"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    real = []
    for path in sorted(folder.glob("*.nii.gz")):
        img = nib.load(path)
        real.append(np.count_nonzero(np.asarray(img.dataobj)) * np.prod(img.header.get_zooms()[:3]) / 1000)
    assert len(real) == 73
    ours = []
    for entry in _dataset(phantom_root)["training"]:
        img = nib.load(phantom_root / entry["label"])
        ours.append(np.count_nonzero(np.asarray(img.dataobj)) * np.prod(img.header.get_zooms()[:3]) / 1000)
    assert min(real) <= min(ours) and max(ours) <= max(real), (min(real), max(real), ours)
    p10, p90 = np.percentile(real, [10, 90])
    assert p10 <= np.median(ours) <= p90, (np.median(ours), p10, p90)


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    a = generate_dataset(tmp_path / "a", sites=["ir_smooth"], cases_per_site=2, seed=5, scale=0.15)
    b = generate_dataset(tmp_path / "b", sites=["ir_smooth"], cases_per_site=2, seed=5, scale=0.15, workers=2)
    c = generate_dataset(tmp_path / "c", sites=["ir_smooth"], cases_per_site=1, seed=6, scale=0.15)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "imagesTr/ir_smooth_000.nii.gz").read_bytes() != (c / "imagesTr/ir_smooth_000.nii.gz").read_bytes()


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": ["pv_standard", "nowhere"]}, "unknown phantom site 'nowhere'"),
    ({"scale": 2.0}, "scale=2.0"),
    ({"cases_per_site": 0}, "cases_per_site=0"),
    ({"workers": 0}, "workers=0"),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_dataset(tmp_path / "x", **kwargs)


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        generate_dataset(target, sites=["pv_standard"], cases_per_site=1, scale=0.15)


def test_progress_bar_counts_every_case_written(tmp_path, capsys):
    from dualssl.data.phantom import generate_dataset

    generate_dataset(tmp_path / "quiet", sites=["pv_standard"], cases_per_site=2, seed=0, scale=0.3)
    assert "phantom" not in capsys.readouterr().err
    generate_dataset(tmp_path / "bar", sites=["pv_standard"], cases_per_site=2, seed=0, scale=0.3, progress=True)
    err = capsys.readouterr().err
    assert "phantom: 100%" in err and "2/2" in err
