"""Dataset lists (MSD, nnU-Net raw, CSV, JSON) and the source/val/test split, on real tiny NIfTI files.

The helpers ``write_case`` / ``write_msd`` are shared with test_transforms.py and test_verify.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dualssl.data.datalist import Case, DatasetError, load_datalist, read_dataset, split_cases

AXES = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAI": (-1, 1, -1)}


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1


def affine_of(spacing=(1.2, 1.2, 2.5), axes: str = "LPS", origin=(30.0, -20.0, 10.0)) -> np.ndarray:
    aff = np.diag([f * s for f, s in zip(AXES[axes], spacing)] + [1.0])
    aff[:3, 3] = origin
    return aff


def write_case(image: Path, label: Path, shape=(40, 36, 14), spacing=(1.2, 1.2, 2.5), axes: str = "LPS",
               seed: int = 0, tumour: bool = True) -> np.ndarray:
    """A body (40 HU + noise) in air (-1000 HU) with a pancreas ellipsoid (100 HU, label 1) that
    holds a small tumour (label 2). Returns the label array."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, -1000, np.int16)
    body = ellipsoid(shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2), (shape[0] * 0.45, shape[1] * 0.42, 1e3))
    img[body] = (40 + rng.normal(0, 8, int(body.sum()))).astype(np.int16)
    pancreas = ellipsoid(shape, (shape[0] * 0.55, shape[1] * 0.5, shape[2] / 2),
                         (shape[0] * 0.18, shape[1] * 0.12, shape[2] * 0.3))
    img[pancreas] = 100
    lab = pancreas.astype(np.uint8)
    if tumour:
        lab[pancreas & ellipsoid(shape, (shape[0] * 0.6, shape[1] * 0.5, shape[2] / 2), (2.5, 2.5, 1.5))] = 2
    image.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    aff = affine_of(spacing, axes)
    nib.save(nib.Nifti1Image(img, aff), str(image))
    nib.save(nib.Nifti1Image(lab, aff), str(label))
    return lab


def write_msd(root: Path, sites: dict[str, int] | None = None, with_site: bool = True, **case_kw) -> Path:
    """An MSD-layout dataset: ``{site: number of cases}`` (default a:3, b:2)."""
    entries, i = [], 0
    for site, n in (sites or {"a": 3, "b": 2}).items():
        for _ in range(n):
            name = f"pancreas_{i:03d}"
            write_case(root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz", seed=i, **case_kw)
            entry = {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
            entries.append({**entry, "site": site} if with_site else entry)
            i += 1
    (root / "dataset.json").write_text(json.dumps({
        "name": "Toy", "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(entries), "training": entries}))
    return root


def test_msd_layout_sites_and_absolute_paths(tmp_path):
    root = write_msd(tmp_path / "msd")
    cases = load_datalist(root)
    assert [c.site for c in cases] == ["a", "a", "a", "b", "b"]
    assert cases[0].case_id == "pancreas_000"
    assert all(Path(c.image).is_absolute() and Path(c.image).is_file() for c in cases)
    info, problems = read_dataset(root)
    assert info.layout == "msd" and info.label_values == (0, 1, 2) and problems == []
    # the dataset.json file itself is accepted as the root too
    assert load_datalist(root / "dataset.json") == cases


def test_msd_without_sites_is_one_site_named_after_dataset(tmp_path):
    cases = load_datalist(write_msd(tmp_path / "msd", {"x": 2}, with_site=False))
    assert {c.site for c in cases} == {"Toy"}


def _write_nnunet(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        write_case(root / "imagesTr" / f"{name}_0000.nii.gz", root / "labelsTr" / f"{name}.nii.gz", seed=i)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1, "tumour": 2},
        "numTraining": len(names), "file_ending": ".nii.gz", "name": "Dataset900_Toy"}))
    return root


def test_nnunet_layout_with_and_without_sites_json(tmp_path):
    root = _write_nnunet(tmp_path / "Dataset900_Toy", ["p1", "p2", "p3"])
    cases = load_datalist(root)
    assert [c.case_id for c in cases] == ["p1", "p2", "p3"] and {c.site for c in cases} == {"Dataset900_Toy"}
    assert cases[0].label.endswith("labelsTr/p1.nii.gz")
    (root / "sites.json").write_text(json.dumps({"p1": "h1", "p2": "h2", "p3": "h1"}))
    assert [c.site for c in load_datalist(root)] == ["h1", "h2", "h1"]
    (root / "sites.json").write_text(json.dumps({"p1": "h1"}))
    with pytest.raises(DatasetError, match=r"sites\.json.*no site for 2 case"):
        load_datalist(root)


def test_csv_and_json_lists_resolve_paths_next_to_the_list(tmp_path):
    write_case(tmp_path / "scans" / "s1.nii.gz", tmp_path / "scans" / "s1_seg.nii.gz", seed=1)
    write_case(tmp_path / "scans" / "s2.nii.gz", tmp_path / "scans" / "s2_seg.nii.gz", seed=2)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "cases.csv").write_text("image,label,site\n../scans/s1.nii.gz,../scans/s1_seg.nii.gz,h1\n"
                                     "../scans/s2.nii.gz,../scans/s2_seg.nii.gz,h2\n")
    from_csv = load_datalist(lists / "cases.csv")
    assert [(c.case_id, c.site) for c in from_csv] == [("s1", "h1"), ("s2", "h2")]
    assert from_csv[0].image == str((tmp_path / "scans" / "s1.nii.gz").resolve())
    (lists / "cases.json").write_text(json.dumps({"labels": {"0": "bg", "1": "pancreas", "2": "tumour"}, "cases": [
        {"image": "../scans/s1.nii.gz", "label": "../scans/s1_seg.nii.gz", "site": "h1", "case_id": "one"}]}))
    info, problems = read_dataset(lists / "cases.json")
    assert problems == [] and info.label_values == (0, 1, 2) and info.cases[0].case_id == "one"


def test_broken_lists_name_the_file_and_the_problem(tmp_path):
    root = write_msd(tmp_path / "msd", {"a": 2})
    (root / "dataset.json").write_text('{"training": [,]}')
    with pytest.raises(DatasetError, match=r"dataset\.json: does not parse as JSON \(line 1"):
        load_datalist(root)
    write_msd(root, {"a": 2})
    (root / "labelsTr" / "pancreas_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/pancreas_001\.nii\.gz: label file not found"):
        load_datalist(root)
    (tmp_path / "bad.csv").write_text("image,mask\nx.nii.gz,y.nii.gz\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: missing column\(s\) label, site"):
        load_datalist(tmp_path / "bad.csv")
    with pytest.raises(DatasetError, match="no dataset.json"):
        load_datalist(tmp_path)


def _cases(site: str, n: int) -> list[Case]:
    return [Case(f"{site}_{i:02d}", f"/x/{site}_{i}.nii.gz", f"/x/{site}_{i}_seg.nii.gz", site) for i in range(n)]


def test_split_is_deterministic_per_site_and_order_independent():
    cases = _cases("a", 10) + _cases("b", 5) + _cases("c", 3)
    split = split_cases(cases, ["a", "b"], val_fraction=0.3, seed=7)
    shuffled = cases[:]
    random.Random(1).shuffle(shuffled)
    again = split_cases(shuffled, ["a", "b"], val_fraction=0.3, seed=7)
    assert split == again
    for site, n in (("a", 10), ("b", 5)):
        val = [c for c in split.val if c.site == site]
        train = [c for c in split.train if c.site == site]
        assert len(val) == round(n * 0.3) and len(train) == n - len(val)
        assert {c.case_id for c in val + train} == {c.case_id for c in cases if c.site == site}
    assert list(split.test) == ["c"] and len(split.test["c"]) == 3
    other = split_cases(cases, ["a", "b"], val_fraction=0.3, seed=8)
    assert {c.case_id for c in other.val} != {c.case_id for c in split.val}


def test_split_names_unknown_sites_and_needs_a_validation_case():
    cases = _cases("a", 4) + _cases("b", 1)
    with pytest.raises(DatasetError, match=r"unknown site\(s\) 'nowhere'.*sites are: a, b"):
        split_cases(cases, ["nowhere"], 0.25, 0)
    with pytest.raises(DatasetError, match="too few"):
        split_cases(cases, ["b"], 0.25, 0)
    split = split_cases(cases, ["a"], 0.1, 0)
    assert len(split.val) == 1 and len(split.train) == 3
