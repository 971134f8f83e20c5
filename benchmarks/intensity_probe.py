"""Is an unseen site's failure the intensity of its pancreas? Predict it as it is and shifted in HU.

For one finished domain-shift study (``studies/domain_shift.py``) with an nnU-Net arm and a dualssl
arm, each unseen site's cases are predicted twice by one trained cell of each arm: as they are, and
with every voxel shifted by ``source pancreas median - site pancreas median`` HU (from the study's
fingerprint), which puts the site's pancreas where the source's was while keeping its geometry (slice
thickness, orientation, noise, shape). A Dice that rises with the shift says the site failed on
intensity; one that stays low says geometry or texture. The phantom is a test fixture, not evidence
about real hospitals::

    python benchmarks/intensity_probe.py --study /path/to/study --nnunet-cell nnunet-s0-pv_standard \\
        --ours-cell plain-s0-pv_standard --sites native_thick,lowdose_sharp --cases 3

Prints a table (site, system, Dice as is, Dice shifted, shift HU) and writes ``intensity_probe.json``
into the study folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shifted_copy(image: Path, shift_hu: float, out: Path) -> Path:
    """``image`` with ``shift_hu`` added to every voxel (same grid, header and dtype range)."""
    img = nib.load(str(image))
    data = np.asanyarray(img.dataobj).astype(np.float32) + np.float32(shift_hu)
    nib.save(nib.Nifti1Image(data, img.affine), str(out))
    return out


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    p, y = pred != 0, label != 0
    denom = p.sum() + y.sum()
    return float(2 * (p & y).sum() / denom) if denom else 1.0


def find_checkpoint(study: Path, cell: str) -> Path:
    """Our cell's checkpoint at its best epoch: ``train_runs/train_<trial>/epoch_<best>/checkpoint.pt``."""
    import csv

    manifest = json.loads((study / "study.json").read_text())
    rows = {r["cell"]: r for r in csv.DictReader((study / "cells.csv").open())}
    row = rows[cell]
    path = (Path(manifest["storage"]) / manifest["experiment"] / "train_runs" / f"train_{row['trial_id']}"
            / f"epoch_{int(row['best_epoch']):04d}" / "checkpoint.pt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint of cell {cell} at its best epoch")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, required=True)
    p.add_argument("--nnunet-cell", default=None, help="a finished nnU-Net cell, e.g. nnunet-s0-pv_standard")
    p.add_argument("--ours-cell", default=None, help="a finished dualssl cell, e.g. plain-s0-pv_standard")
    p.add_argument("--ours-checkpoint", type=Path, default=None, help="instead of --ours-cell: its checkpoint")
    p.add_argument("--sites", default=None, help="comma-separated unseen sites (default: all non-source)")
    p.add_argument("--cases", type=int, default=3, help="cases per site")
    args = p.parse_args(argv)

    import torch

    from dualssl.data.datalist import load_datalist
    from dualssl.evaluation.inference import Predictor
    from dualssl.evaluation.run import load_checkpoint_model
    from dualssl.peers.nnunet import NnunetPredictor
    from studies.peer_cell import peer_work_dir

    torch.set_num_threads(2)
    study = args.study.resolve()
    manifest = json.loads((study / "study.json").read_text())
    fingerprint = json.loads((study / "fingerprint" / "fingerprint.json").read_text())
    source = manifest["source_sites"][0]
    src_median = fingerprint["sites"][source]["foreground_percentiles"]["p50"]
    train_storage = f"{manifest['storage']}/{manifest['experiment']}/train_runs"
    systems = {}
    if args.nnunet_cell:
        folds = sorted((peer_work_dir(train_storage, args.nnunet_cell) / "nnUNet_results").glob("**/fold_0"))
        systems[f"nnU-Net ({args.nnunet_cell})"] = NnunetPredictor(folds[0], mirroring=False)
    ckpt = args.ours_checkpoint or (find_checkpoint(study, args.ours_cell) if args.ours_cell else None)
    if ckpt is not None:
        model, cfg = load_checkpoint_model(ckpt)
        systems[f"dualssl ({args.ours_cell or ckpt.name})"] = Predictor(model.eval(), cfg, "cpu")
    cases = load_datalist(manifest["data_root"])
    sites = args.sites.split(",") if args.sites else sorted({c.site for c in cases} - {source})
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualssl-probe-") as tmp:
        for site in sites:
            shift = src_median - fingerprint["sites"][site]["foreground_percentiles"]["p50"]
            for case in [c for c in cases if c.site == site][: args.cases]:
                label = np.asanyarray(nib.load(case.label).dataobj)
                moved = shifted_copy(Path(case.image), shift, Path(tmp) / f"{case.case_id}_shifted.nii.gz")
                for name, predictor in systems.items():
                    t = time.time()
                    as_is = dice(np.asanyarray(predictor.predict_file(case.image).dataobj), label)
                    shifted = dice(np.asanyarray(predictor.predict_file(moved).dataobj), label)
                    rows.append({"site": site, "case": case.case_id, "system": name, "dice": as_is,
                                 "dice_shifted": shifted, "shift_hu": shift, "seconds": time.time() - t})
                    print(f"[probe] {site} {case.case_id} {name}: Dice {as_is:.3f} -> {shifted:.3f} "
                          f"(shift {shift:+.0f} HU)", flush=True)
    print("\nphantom (a test fixture, not evidence about real hospitals); mean Dice per site and system")
    print("| site | system | cases | Dice as is | Dice shifted | shift (HU) |\n|---|---|---|---|---|---|")
    for site in sites:
        for name in systems:
            part = [r for r in rows if r["site"] == site and r["system"] == name]
            if part:
                print(f"| {site} | {name} | {len(part)} | {np.mean([r['dice'] for r in part]):.3f} | "
                      f"{np.mean([r['dice_shifted'] for r in part]):.3f} | {part[0]['shift_hu']:+.0f} |")
    (study / "intensity_probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
