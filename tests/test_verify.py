"""verify_dataset reports every problem at once, each naming its file; the CLI exits non-zero on fatal ones."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from dualssl.cli import main
from dualssl.data.verify import verify_dataset
from test_datalist import write_msd


def _replace(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, nib.load(path).affine if affine is None else affine), str(path))


def test_clean_dataset_has_no_problems_and_cli_exits_zero(tmp_path, capsys):
    root = write_msd(tmp_path / "msd", {"a": 2})
    assert verify_dataset(root) == []
    assert main(["verify-dataset", str(root)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    root = write_msd(tmp_path / "msd", {"a": 4, "b": 4})
    lab = lambda i: root / "labelsTr" / f"pancreas_{i:03d}.nii.gz"  # noqa: E731
    img = lambda i: root / "imagesTr" / f"pancreas_{i:03d}.nii.gz"  # noqa: E731
    shape = nib.load(img(0)).shape
    # 0: label value 3 is not declared (0, 1, 2)
    data = np.asanyarray(nib.load(lab(0)).dataobj).copy()
    data[0, 0, 0] = 3
    _replace(lab(0), data)
    # 1: label on another grid (shape)
    _replace(lab(1), np.pad(np.asanyarray(nib.load(lab(1)).dataobj), ((0, 0), (0, 0), (0, 2))))
    # 2: label shifted by 3 mm (affine)
    moved = nib.load(img(2)).affine.copy()
    moved[0, 3] += 3.0
    _replace(lab(2), np.asanyarray(nib.load(lab(2)).dataobj), moved)
    # 3: NaN intensities in a float image
    pixels = np.asanyarray(nib.load(img(3)).dataobj).astype(np.float32)
    pixels[5, 5, 5] = np.nan
    _replace(img(3), pixels)
    # 4: truncated gzip
    img(4).write_bytes(img(4).read_bytes()[:2000])
    # 5: empty label (a warning, not fatal)
    _replace(lab(5), np.zeros(shape, np.uint8))
    # 6: missing image file
    img(6).unlink()
    # 7: not NIfTI at all
    lab(7).write_bytes(b"this is not a NIfTI file")

    problems = verify_dataset(root, source_sites=["a", "hospital_z"])
    by_path = {}
    for p in problems:
        by_path.setdefault(p.path, []).append(p)
    expected = {
        str(lab(0)): (True, "label values [3] are not declared"),
        str(lab(1)): (True, "label shape"),
        str(lab(2)): (True, "label affine differs"),
        str(img(3)): (True, "1 NaN or inf intensities"),
        str(img(4)): (True, "truncated or corrupt"),
        str(lab(5)): (False, "label is empty"),
        str(img(6)): (True, "image file not found"),
        str(lab(7)): (True, "unreadable NIfTI label"),
    }
    assert set(by_path) == set(expected) | {str(root / "dataset.json")}, problems
    for path, (fatal, text) in expected.items():
        assert [(p.fatal, text in p.message) for p in by_path[path]] == [(fatal, True)], by_path[path]
    # every case of site a is broken: the site itself is named too (b keeps case 5, only a warning)
    assert [(p.fatal, p.message) for p in by_path[str(root / "dataset.json")]] == [
        (True, "unknown source site 'hospital_z'; known sites: a, b"),
        (True, "site 'a' has no usable case (all 4 listed case(s) are missing or broken, see above)")]
    assert str(by_path[str(lab(5))][0]) == f"WARN {lab(5)}: label is empty (no pancreas voxel)"
    assert str(by_path[str(img(6))][0]).startswith(f"FATAL {img(6)}: image file not found")

    assert main(["verify-dataset", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"FATAL {lab(1)}: label shape" in out and "8 problem(s), 7 fatal" in out


def test_list_level_problems(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 2})
    tree = json.loads((root / "dataset.json").read_text())
    tree["training"].append(dict(tree["training"][0]))  # the same case twice
    tree["training"].append({"image": "./imagesTr/pancreas_000.nii.gz"})  # no label
    (root / "dataset.json").write_text(json.dumps(tree))
    messages = [str(p) for p in verify_dataset(root)]
    assert any("training[2]: case id 'pancreas_000' is listed twice" in m for m in messages), messages
    assert any(m.startswith("FATAL") and "training[3]: expected" in m for m in messages), messages
    [absent] = verify_dataset(tmp_path / "absent")
    assert absent.fatal and absent.path == str(tmp_path / "absent") and "dataset root not found" in absent.message
    (root / "dataset.json").write_text("{not json")
    assert main(["verify-dataset", str(root)]) == 1


def test_source_sites_must_split_into_train_and_validation(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 1, "b": 4, "c": 2})
    where = str(root / "dataset.json")
    found = verify_dataset(root, source_sites=["a", "b"], val_fraction=0.25, split_seed=0, workers=2)
    assert [(p.fatal, p.path, p.message.split(";")[0].split(" (")[0]) for p in found] == [
        (True, where, "source site 'a' has 1 usable case(s)"),
        (False, where, "source validation holds 1 case")]  # b's 4 cases x 0.25: 1 validation case
    # 2 cases at 0.25: round(0.5) = 0, raised to 1 validation case; the whole validation set is 1 scan
    [warn] = verify_dataset(root, source_sites=["c"], val_fraction=0.25)
    assert not warn.fatal and "source validation holds 1 case" in warn.message
    assert verify_dataset(root, source_sites=["b", "c"], val_fraction=0.25) == []  # 1 + 1 validation cases
    lab = root / "labelsTr" / "pancreas_005.nii.gz"  # one of c's two cases: c keeps 1 usable case
    lab.write_bytes(b"broken")
    messages = [p.message for p in verify_dataset(root, source_sites=["c"], val_fraction=0.25) if p.fatal]
    assert any("unreadable NIfTI label" in m for m in messages)
    assert any("source site 'c' has 1 usable case(s)" in m for m in messages), messages


# --- a patient in two places ---------------------------------------------------------------------
def _list_again(root, source: int, name: str, site: str, dtype=None):
    """Write case ``source``'s image (re-saved, as ``dtype`` if given) and label under ``name``, listed at ``site``."""
    img = nib.load(root / "imagesTr" / f"pancreas_{source:03d}.nii.gz")
    data = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image(data.astype(dtype) if dtype else data, img.affine),
             str(root / "imagesTr" / f"{name}.nii.gz"))
    lab = nib.load(root / "labelsTr" / f"pancreas_{source:03d}.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), lab.affine), str(root / "labelsTr" / f"{name}.nii.gz"))
    tree = json.loads((root / "dataset.json").read_text())
    tree["training"].append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz", "site": site})
    (root / "dataset.json").write_text(json.dumps(tree))
    return str(root / "imagesTr" / f"pancreas_{source:03d}.nii.gz"), str(root / "imagesTr" / f"{name}.nii.gz")


def test_a_scan_listed_again_under_another_name_and_site_is_refused_naming_both_files(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 3, "b": 2})
    # the same voxels saved as float32 under another name, at another site: still the same scan
    original, copy = _list_again(root, 0, "hospital_b_017", "b", dtype=np.float32)
    found = verify_dataset(root, source_sites=["a"], val_fraction=0.34, workers=2)
    [dup] = [p for p in found if "identical voxel data" in p.message]
    assert dup.fatal and dup.path == copy and original in dup.message
    assert "sites 'a' and 'b'" in dup.message and "remove one" in dup.message
    # without source sites too (dualssl verify-dataset)
    assert [p.fatal for p in verify_dataset(root) if "identical voxel data" in p.message] == [True]
    # a different scan of the same shape is not a duplicate
    assert not [p for p in verify_dataset(write_msd(tmp_path / "clean", {"a": 3, "b": 2}))]


def test_a_scan_in_training_and_validation_of_the_source_site_is_refused(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 1, "b": 2})
    original, copy = _list_again(root, 0, "pancreas_900", "a")  # site a: 2 cases, so 1 trains and 1 validates
    [dup] = [p for p in verify_dataset(root, source_sites=["a"], val_fraction=0.25) if "identical" in p.message]
    assert dup.fatal and original in dup.message and dup.path == copy
    assert "in training and validation of source site 'a'" in dup.message or \
        "in validation and training of source site 'a'" in dup.message
    # at a test site, two copies in one part count twice: a warning
    root = write_msd(tmp_path / "msd2", {"a": 2, "b": 2})
    _list_again(root, 2, "pancreas_901", "b")
    [warn] = [p for p in verify_dataset(root, source_sites=["a"], val_fraction=0.5) if "identical" in p.message]
    assert not warn.fatal and "counts twice" in warn.message
