"""Real CT through the same path as training: a CSV list -> load_datalist -> preprocess_transforms.

NIH Pancreas-CT 0001 (LAI, 512x512x240 int16, 0.86x0.86x1.0 mm, manual label; Roth et al., TCIA,
CC BY) and the TotalSegmentator example (RAS, 3 mm, int32, predicted label; Apache-2.0).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from dualssl.config import DataConfig
from dualssl.data.datalist import load_datalist
from dualssl.data.transforms import invert_to_input, preprocess_transforms

pytestmark = pytest.mark.realdata

SCANS = {  # case id -> (image, label) under shared/data/real
    "nih_0001": ("nih_pancreas_ct_0001/ct.nii.gz", "nih_pancreas_ct_0001/pancreas.nii.gz"),
    "ts_example": ("totalsegmentator_example/ct.nii.gz", "totalsegmentator_example/pancreas_predicted.nii.gz"),
}


@pytest.fixture(scope="module")
def preprocessed(shared_data, tmp_path_factory):
    """Each scan listed in a CSV (absolute paths, one site per scanner) and preprocessed once."""
    listing = tmp_path_factory.mktemp("real") / "cases.csv"
    rows = [f"{shared_data / 'real' / img},{shared_data / 'real' / lab},{cid.split('_')[0]},{cid}"
            for cid, (img, lab) in SCANS.items()]
    listing.write_text("image,label,site,case_id\n" + "\n".join(rows) + "\n")
    cfg = DataConfig()  # default spacing and HU window
    pre = preprocess_transforms(cfg)
    return cfg, {case.case_id: (case, pre(case.as_dict())) for case in load_datalist(listing)}


def _volume_ml(path) -> tuple[float, np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    mask = np.asanyarray(img.dataobj) > 0
    return float(mask.sum() * np.prod(img.header.get_zooms()[:3]) / 1000.0), mask, img


@pytest.mark.parametrize("case_id", list(SCANS))
def test_real_scan_keeps_pancreas_volume_and_hu(preprocessed, case_id):
    cfg, out = preprocessed
    case, d = out[case_id]
    image, label = d["image"], d["label"]
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), cfg.spacing, rtol=1e-5)
    ml_in, mask_in, label_img = _volume_ml(case.label)
    ml_out = float(label.sum()) * float(np.prod(cfg.spacing)) / 1000.0
    assert abs(ml_out - ml_in) / ml_in < 0.05, (ml_in, ml_out)
    # median HU under the preprocessed label, the window inverted
    low, high = cfg.hu_window
    hu_out = float(image[label > 0].median()) * (high - low) + low
    if case_id == "nih_0001":  # portal-venous pancreas (site_stats.json: core median 110 HU)
        assert 60.0 < hu_out < 140.0
        # back to the LAI 512x512x240 grid: same shape, mostly the same voxels
        back = invert_to_input(label, d, cfg) > 0.5
        assert back.shape == label_img.shape
        assert 2.0 * (back & mask_in).sum() / (back.sum() + mask_in.sum()) > 0.85
    else:  # native fatty pancreas: compare with the median under the original label
        hu_in = float(np.median(np.asanyarray(nib.load(case.image).dataobj)[mask_in]))
        assert abs(hu_out - hu_in) < 10.0, (hu_in, hu_out)
