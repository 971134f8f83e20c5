"""``verify_dataset(root)``: every problem of a dataset at once, each naming its file.

The list itself (layout, JSON syntax, missing files, duplicate ids, sites) is checked by
:func:`dualssl.data.datalist.read_dataset`; here each case's files are opened: headers first
(shape, affine, spacing, image/label agreement), then the voxels (readability to the last byte,
NaN/inf intensities, label values against the declared labels, empty labels). Integer images hold
no NaN, so only floating-point images are scanned for them.

While an image's voxels are in memory their content hash is taken (:func:`image_digest`), and
:func:`duplicate_problems` finds one scan listed twice (public abdominal CT sets reuse scans under
other names): identical voxel data at two sites, or, with the source sites given, in training and
validation of one source site, are fatal (a patient in two places); two copies inside one part of
one site are a warning. Only identical arrays (same shape and values, any dtype) are found: a
re-oriented, cropped or resampled copy is not.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from dualssl.data.datalist import DEFAULT_LIST_LABELS, Case, DatasetError, Problem, read_dataset, split_cases
from dualssl.data.transforms import pair_mismatch

__all__ = ["Problem", "verify_dataset", "verify_case", "split_problems", "image_digest", "duplicate_problems"]


def verify_dataset(root: str | Path, source_sites: Sequence[str] | None = None, *,
                   val_fraction: float | None = None, split_seed: int = 0, workers: int = 1) -> list[Problem]:
    """All problems of the dataset at ``root``, list problems first, then per case, then per site.

    ``source_sites``, if given, are checked against the dataset's sites, and every site must keep
    at least one usable case (files present and readable); with ``val_fraction`` too, each source
    site must give both training and validation cases (:func:`split_problems`). Scans listed twice
    (identical voxel data) are reported by :func:`duplicate_problems`. ``workers`` threads read the
    files (decompression and hashing release the GIL).
    """
    info, problems = read_dataset(root)
    present = [c for c in info.cases if Path(c.image).is_file() and Path(c.label).is_file()]
    digests: dict[Case, str] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for case, (case_problems, digest) in zip(present, pool.map(lambda c: _check_case(c, info.label_values),
                                                                   present)):
            problems.extend(case_problems)
            if digest is not None:
                digests[case] = digest
    problems.extend(duplicate_problems(digests, source_sites or (), val_fraction, split_seed))
    if source_sites:
        known = sorted({c.site for c in info.cases})
        for site in source_sites:
            if site not in known:
                problems.append(Problem(True, str(info.list_file), f"unknown source site {site!r}; known "
                                        f"sites: {', '.join(known) or '(none)'}"))
        broken = {p.path for p in problems if p.fatal}
        usable = [c for c in present if c.image not in broken and c.label not in broken]
        for site in known:
            n_listed = sum(c.site == site for c in info.cases)
            if not any(c.site == site for c in usable):
                problems.append(Problem(True, str(info.list_file), f"site {site!r} has no usable case (all "
                                        f"{n_listed} listed case(s) are missing or broken, see above)"))
        if val_fraction is not None:
            problems.extend(split_problems(usable, [s for s in source_sites if s in known], val_fraction,
                                           split_seed, str(info.list_file)))
    return problems


def split_problems(cases: Sequence[Case], source_sites: Sequence[str], val_fraction: float, seed: int,
                   where: str) -> list[Problem]:
    """Source sites too small for ``split_cases``: fatal below 2 usable cases (1 train + 1 val);
    a warning when the whole validation set is a single case (one scan then decides the selection)."""
    problems: list[Problem] = []
    n_val = 0
    for site in dict.fromkeys(source_sites):
        site_cases = [c for c in cases if c.site == site]
        if not site_cases:
            continue  # reported as a site without usable cases
        try:
            n_val += len(split_cases(site_cases, [site], val_fraction, seed).val)
        except DatasetError:
            problems.append(Problem(True, where, f"source site {site!r} has {len(site_cases)} usable case(s); "
                                    "training and validation need at least 2 (1 to train, 1 to validate): "
                                    "add cases or choose another --source-site"))
    if n_val == 1:
        problems.append(Problem(False, where, f"source validation holds 1 case (data.val_fraction={val_fraction}): "
                                "one scan decides every trial's selection; add cases or raise data.val_fraction"))
    return problems


def image_digest(data: np.ndarray) -> str:
    """SHA-256 of a decoded voxel array: its shape, then its values as float32, one axial slab at a time
    (the same scan saved as int16 or float32, or with a scale slope that gives the same values, hashes
    the same; memory stays one slab). ``data``: ``(X, Y, Z)`` or ``(X, Y, Z, 1)``."""
    h = hashlib.sha256(repr(tuple(int(n) for n in data.shape[:3])).encode())
    flat = data.reshape(data.shape[0], data.shape[1], -1)
    step = max(1, (1 << 22) // max(1, flat.shape[0] * flat.shape[1]))  # ~16 MB of float32 a slab
    for z in range(0, flat.shape[2], step):
        h.update(np.ascontiguousarray(flat[:, :, z:z + step], dtype=np.float32).tobytes())
    return h.hexdigest()


def duplicate_problems(digests: dict[Case, str], source_sites: Sequence[str] = (), val_fraction: float | None = None,
                       split_seed: int = 0) -> list[Problem]:
    """Cases whose images hold identical voxel data (``digests``: case -> :func:`image_digest`).

    Fatal, naming both files: copies at two sites, or (``source_sites`` given) at one source site in
    training and validation of the split (``val_fraction``; without it, any two copies at a source
    site, which the split may part). A warning: two copies in one part of one site (the scan counts
    twice), and copies at two severity-sweep sites of the phantom (``sweep-...``: sweep sites render
    the same patients, so two neutral settings, e.g. ``hu_scale`` 1 and ``cupping`` 0, are one image).
    """
    from dualssl.data.phantom.sweeps import parse_sweep_name

    by_digest: dict[str, list[Case]] = {}
    for case, digest in digests.items():
        by_digest.setdefault(digest, []).append(case)
    part: dict[Case, str] = {}
    sources = [s for s in dict.fromkeys(source_sites) if any(c.site == s for c in digests)]
    if sources and val_fraction is not None:
        try:
            split = split_cases(list(digests), sources, val_fraction, split_seed)
            part = {**{c: "training" for c in split.train}, **{c: "validation" for c in split.val}}
        except DatasetError:
            part = {}  # too few cases: reported by split_problems

    def is_sweep(site: str) -> bool:
        try:
            return parse_sweep_name(site) is not None
        except ValueError:
            return False

    problems = []
    for copies in by_digest.values():
        first = copies[0]
        for other in copies[1:]:
            where = f"identical voxel data to {first.image} (case {first.case_id!r}, site {first.site!r})"
            if other.site != first.site:
                fatal = not (is_sweep(other.site) and is_sweep(first.site))
                what = f"the same scan at sites {first.site!r} and {other.site!r}"
            elif first.site in sources and (not part or part.get(first) != part.get(other)):
                fatal = True
                what = (f"the same scan in {part.get(first)} and {part.get(other)} of source site {first.site!r}"
                        if part else f"the same scan twice at source site {first.site!r} (the split may part them)")
            else:
                fatal = False
                what = f"the same scan twice at site {first.site!r}: it counts twice"
            fix = "remove one of the two entries (or the file) from the dataset list" if fatal else \
                "remove one copy unless it is meant"
            problems.append(Problem(fatal, other.image, f"{where}: {what}; {fix}"))
    return problems


def verify_case(case: Case, label_values: Sequence[int] = DEFAULT_LIST_LABELS) -> list[Problem]:
    """Problems of one case's image and label files."""
    return _check_case(case, label_values)[0]


def _check_case(case: Case, label_values: Sequence[int]) -> tuple[list[Problem], str | None]:
    """(problems of one case's files, :func:`image_digest` of its image or None when unreadable)."""
    problems: list[Problem] = []
    digest = None
    image = _open(case.image, "image", problems)
    label = _open(case.label, "label", problems)
    if image is not None and label is not None:
        mismatch = pair_mismatch(image.shape[:3], image.affine, label.shape[:3], label.affine)
        if mismatch:
            problems.append(Problem(True, case.label, f"{mismatch} of image {case.image}; resample the label "
                                    "onto the image grid"))
    if image is not None:
        data = _read(image, case.image, problems)
        if data is not None and np.issubdtype(data.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(data)))
            if bad:
                problems.append(Problem(True, case.image, f"{bad} NaN or inf intensities; re-export the scan"))
        if data is not None:
            digest = image_digest(data)
        del data
    if label is not None:
        data = _read(label, case.label, problems)
        if data is not None:
            problems.extend(_label_problems(case.label, data, label_values))
    return problems, digest


def _open(path: str, key: str, problems: list[Problem]) -> nib.Nifti1Image | None:
    """Header only (cheap); None with a problem recorded if unreadable or not one 3D volume."""
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises many types for broken headers
        problems.append(Problem(True, path, f"unreadable NIfTI {key} ({type(exc).__name__}: {exc}); re-export it"))
        return None
    shape = img.shape
    if len(shape) < 3 or len(shape) > 4 or (len(shape) == 4 and shape[3] != 1):
        problems.append(Problem(True, path, f"{key} has shape {shape}; expected one 3D volume"))
        return None
    zooms = img.header.get_zooms()[:3]
    if not all(np.isfinite(z) and z > 0 for z in zooms) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        problems.append(Problem(True, path, f"{key} has invalid voxel spacing {tuple(float(z) for z in zooms)} "
                                "or a singular affine; fix the header"))
        return None
    return img


def _read(img: nib.Nifti1Image, path: str, problems: list[Problem]) -> np.ndarray | None:
    """All voxels (detects truncated/corrupt files); None with a problem recorded on failure."""
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError, ValueError ...
        problems.append(Problem(True, path, f"voxel data unreadable, the file is truncated or corrupt "
                                f"({type(exc).__name__}: {exc}); re-export or re-download it"))
        return None


def _label_problems(path: str, data: np.ndarray, label_values: Sequence[int]) -> list[Problem]:
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            return [Problem(True, path, "label holds non-integer or NaN values; labels must be integer ids")]
        data = data.astype(np.int64)
    if data.size and int(data.min()) >= 0 and int(data.max()) < 2**16:
        values = np.flatnonzero(np.bincount(data.ravel().astype(np.int64)))  # faster than np.unique
    else:
        values = np.unique(data)
    extra = sorted(set(int(v) for v in values) - set(int(v) for v in label_values))
    problems = []
    if extra:
        problems.append(Problem(True, path, f"label values {extra} are not declared (declared: "
                                f"{sorted(int(v) for v in label_values)}); fix the label or the list's labels"))
    if not np.any(data > 0):
        problems.append(Problem(False, path, "label is empty (no pancreas voxel)"))
    return problems

