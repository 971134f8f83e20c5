"""Write a phantom dataset in the Medical Segmentation Decathlon layout.

``DIR/imagesTr/<site>_<nnn>.nii.gz``, ``DIR/labelsTr/<site>_<nnn>.nii.gz``, ``DIR/dataset.json``
(MSD keys plus a ``site`` per training entry) and ``DIR/phantom_cases.json`` (what each case
drew and measured). One seed gives byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from dualssl.data.phantom.measure import FAT, core_medians, erosion_for
from dualssl.data.phantom.options import PhantomOptions, phantom_options
from dualssl.data.phantom.render import PhantomCase, render_case
from dualssl.data.phantom.shape_bank import ShapeBank
from dualssl.data.phantom.sites import SITE_PROFILES, SiteProfile, get_profile
from dualssl.data.phantom.sweeps import DEFAULT_BASE, sweep_record, sweep_sites
from dualssl.data.phantom.tissues import Tissue

REPORTED_TISSUES = {"pancreas": Tissue.PANCREAS, "liver": Tissue.LIVER, "spleen": Tissue.SPLEEN,
                    "aorta": Tissue.AORTA, "portal_vein": Tissue.PORTAL_VEIN, "kidney": Tissue.KIDNEY,
                    "muscle": Tissue.MUSCLE, "fat": FAT}
"""Tissues whose core medians (stored values) go into phantom_cases.json."""


SWEEP_PATIENTS = 100_000
"""Sweep sites draw their patients from the base site's seeds at index + this: the same patients at every
severity (paired along the sweep), never the base site's own patients, which a study may train on."""


def case_seed(seed: int, site: str, index: int) -> int:
    """Seed of case ``index`` of ``site``: depends on (seed, site, index) only, not on the order or
    the number of workers."""
    seq = np.random.SeedSequence([int(seed), zlib.crc32(site.encode()), int(index)])
    return int(seq.generate_state(1, np.uint32)[0])


def case_id(site: str, index: int) -> str:
    return f"{site}_{index:03d}"


def nifti_bytes(array: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    """A .nii.gz file's bytes, reproducible: qform = sform = ``affine`` (scanner), units mm, and a
    gzip stream without time stamp or file name."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _write_case(job: tuple[SiteProfile, int, int, float, str, str | None, PhantomOptions]) -> dict:
    profile, index, seed, scale, out, bank, options = job
    site = profile.name
    case: PhantomCase = render_case(profile, seed, scale, shape_bank=bank, options=options)
    cid = case_id(site, index)
    root = Path(out)
    desc = f"dualssl phantom {site} seed {seed} scale {scale:g}"
    (root / "imagesTr" / f"{cid}.nii.gz").write_bytes(nifti_bytes(case.image, case.affine, desc))
    (root / "labelsTr" / f"{cid}.nii.gz").write_bytes(nifti_bytes(case.label, case.affine, desc + " label"))
    measured = core_medians(case.image.astype(np.float32), case.organs, case.pure, REPORTED_TISSUES,
                            erode_px=erosion_for(profile.blur_px))
    info = dict(case.info, case_id=cid, measured_hu=measured)
    return info


def generate_dataset(out: str | Path, sites: list[str | SiteProfile] | None = None, cases_per_site: int = 4,
                     seed: int = 0, scale: float = 0.5, workers: int = 1,
                     shape_bank: str | Path | None = None, progress: bool = False,
                     options: PhantomOptions | str | None = None) -> Path:
    """Render ``cases_per_site`` cases of each site in ``sites`` (default: all seven) and write them
    under ``out`` in the MSD layout; returns ``out``.

    ``sites`` holds site names, sweep names (``sweep-noise-20``) or :class:`SiteProfile` objects
    (e.g. from :func:`~dualssl.data.phantom.sweeps.sweep_profiles`). A derived (sweep) profile renders
    new patients from its base's seed stream (:data:`SWEEP_PATIENTS`), the same ones for every sweep
    profile of that base and never the base site's own; dataset.json's ``sweeps`` gives each sweep
    site's axis and value.

    ``scale`` 1.0 = clinical voxel sizes (tens of MB per case), 0.5 = demo (a few MB),
    0.3 = tests (a few hundred kB). ``workers`` > 1 renders in that many processes.
    ``shape_bank``: a folder of real pancreas masks (``shape_bank.py``); each case's pancreas is one
    of them, deformed and placed in the anatomy. None (default): the procedural pancreas.
    ``options``: :class:`~dualssl.data.phantom.options.PhantomOptions` or a preset name ("default",
    "clinical": long coverage, bowel loops packed around a lean pancreas; about 1.6 times the voxels).
    None = the defaults.
    ``progress``: a tqdm bar of the cases written (on stderr).
    """
    sites = list(SITE_PROFILES) if sites is None else list(sites)
    if not sites:
        raise ValueError("sites: name at least one site, or pass None for all of "
                         f"{', '.join(SITE_PROFILES)}")
    profiles = [get_profile(s) for s in sites]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"sites: {names} names a site twice")
    if not isinstance(cases_per_site, int) or cases_per_site < 1:
        raise ValueError(f"cases_per_site={cases_per_site!r}: must be an integer >= 1")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: must be an integer >= 1")
    if not (isinstance(scale, (int, float)) and 0.05 <= float(scale) <= 1.0):
        raise ValueError(f"scale={scale!r}: must lie in [0.05, 1.0] (1.0 = clinical voxel sizes, "
                         "0.5 = demo size, 0.3 = test size)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose a dataset folder to write")
    options = phantom_options(options)
    bank = None
    if shape_bank is not None:
        bank = str(ShapeBank(shape_bank).folder)       # checks the folder before any case renders
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)

    jobs = [(p, i, case_seed(seed, p.seed_site, i + (SWEEP_PATIENTS if p.sweep else 0)), float(scale), str(out), bank, options)
            for p in profiles for i in range(cases_per_site)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="phantom", unit="case", disable=not progress)
    if workers == 1:
        infos = []
        for j in jobs:
            infos.append(_write_case(j))
            bar.update()
    else:
        # spawn: a forked child of a process that holds torch/OpenMP threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            infos = []
            for info in pool.map(_write_case, jobs):
                infos.append(info)
                bar.update()
    bar.close()

    training = [{"image": f"./imagesTr/{i['case_id']}.nii.gz", "label": f"./labelsTr/{i['case_id']}.nii.gz",
                 "site": i["site"]} for i in infos]
    dataset = {
        "name": "dualssl-phantom",
        "description": "Procedural multi-site abdominal CT phantom with pancreas labels (synthetic, "
                       "no patient data); one site per scanner/protocol profile",
        "reference": "dualssl.data.phantom",
        "licence": "synthetic data, free to use",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "sites": {p.name: {"phase": p.phase, "orientation": p.orientation, "dtype": p.dtype,
                           "description": p.description} for p in profiles},
        "phantom": {"seed": int(seed), "scale": float(scale), "cases_per_site": cases_per_site},
    }
    if bank is not None:
        dataset["phantom"]["shape_bank"] = bank
    dataset["phantom"].update(options.changes())
    sweeps = {p.name: sweep_record(p) for p in profiles if p.sweep}
    if sweeps:
        dataset["sweeps"] = sweeps
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    (out / "phantom_cases.json").write_text(json.dumps(infos, indent=1) + "\n")
    return out


def generate_sweep_dataset(out: str | Path, sweeps: dict[str, list[float | str]], cases_per_site: int = 4,
                           seed: int = 0, scale: float = 0.5, base: str = DEFAULT_BASE,
                           workers: int = 1, shape_bank: str | Path | None = None,
                           options: PhantomOptions | str | None = None) -> Path:
    """Write ``base`` and one site per swept value (``sweeps``: axis -> values, e.g.
    ``{"noise": [5, 20, 40], "slice": [3, 5]}``); every sweep site holds the same ``cases_per_site``
    patients, other than the base site's own (:data:`SWEEP_PATIENTS`).

    dataset.json's ``sweeps`` maps each sweep site to ``{"axis", "value", "unit", "base",
    "base_value"}``; the base's cases are byte-identical to :func:`generate_dataset`'s.
    """
    return generate_dataset(out, sites=sweep_sites(sweeps, base), cases_per_site=cases_per_site, seed=seed,
                            scale=scale, workers=workers, shape_bank=shape_bank, options=options)
