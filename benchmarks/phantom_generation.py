"""Time the phantom generator and compare what it writes with real figures.

Generates SITES x CASES at SCALE (default: the first six sites x 8 cases at the default 0.5) into
a temporary folder, then prints: wall time and size per case; pancreas volumes (median, IQR)
beside the 73 real MSD Task07 masks; per-site medians of the organ-core HU (as stored, so the
calibration offsets show) beside each profile's expected pancreas range.

    python benchmarks/phantom_generation.py [--workers 2] [--cases 8] [--scale 0.5]
    python benchmarks/phantom_generation.py --sweep noise=5,20,40 --sweep slice=3,5   # a severity sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dualssl.data.phantom import SITE_PROFILES, Tissue, generate_dataset, get_profile
from dualssl.data.phantom.sweeps import parse_sweep_spec, sweep_sites

REPO = Path(__file__).resolve().parents[1]
MSD = Path(os.environ.get("DUALSSL_SHARED_DATA", REPO.parent / "shared" / "data")) / "labels" / "msd_task07_pancreas"
COLUMNS = ("pancreas", "liver", "spleen", "aorta", "portal_vein", "kidney", "muscle", "fat")


def _volume_ml(path: Path) -> float:
    img = nib.load(path)
    return float(np.count_nonzero(np.asarray(img.dataobj)) * np.prod(img.header.get_zooms()[:3]) / 1000.0)


def _summary(values: list[float]) -> str:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return f"median {med:6.1f}  IQR {q1:6.1f}-{q3:6.1f}  range {min(values):6.1f}-{max(values):6.1f}  (n={len(values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default=",".join(list(SITE_PROFILES)[:6]))
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep (default: a temp folder)")
    parser.add_argument("--sweep", action="append", metavar="AXIS=V1,V2",
                        help="time a severity sweep of pv_standard instead of --sites (repeatable)")
    args = parser.parse_args(argv)
    sites = [s for s in args.sites.split(",") if s]
    if args.sweep:
        sites = [p.name for p in sweep_sites(dict(parse_sweep_spec(spec) for spec in args.sweep))]

    out = args.keep or Path(tempfile.mkdtemp(prefix="dualssl_phantom_bench_")) / "dataset"
    try:
        t0 = time.perf_counter()
        generate_dataset(out, sites=sites, cases_per_site=args.cases, seed=args.seed, scale=args.scale,
                         workers=args.workers)
        wall = time.perf_counter() - t0
        infos = json.loads((out / "phantom_cases.json").read_text())
        n = len(infos)
        sizes = [(out / "imagesTr" / f"{i['case_id']}.nii.gz").stat().st_size / 1e6 for i in infos]
        print(f"generated {len(sites)} sites x {args.cases} cases = {n} cases at scale {args.scale:g} "
              f"with {args.workers} worker(s) on {os.cpu_count()} CPU(s)")
        print(f"wall time {wall:.1f} s = {wall / n:.2f} s per case; image files {np.mean(sizes):.2f} MB per case "
              f"(max {max(sizes):.2f}), {sum(sizes):.0f} MB in all")
        shapes = {s: [i["shape"] for i in infos if i["site"] == s][0] for s in sites}
        print("first case shape per site: " + ", ".join(f"{s} {tuple(v)}" for s, v in shapes.items()))

        ours = [_volume_ml(out / "labelsTr" / f"{i['case_id']}.nii.gz") for i in infos]
        print("\npancreas volume (ml)")
        print(f"  phantom        {_summary(ours)}")
        if MSD.is_dir():
            real = [_volume_ml(p) for p in sorted(MSD.glob("*.nii.gz"))]
            print(f"  MSD Task07     {_summary(real)}")
        else:
            print(f"  MSD Task07     ({MSD} absent)")

        print("\nmedian organ-core values per site (stored values: calibration and cupping included; "
              "'-' = no pure core at this slice thickness)")
        print(f"  {'site':16s} {'phase':10s} " + " ".join(f"{c[:8]:>8s}" for c in COLUMNS)
              + "   expected pancreas")
        for s in sites:
            rows = [i["measured_hu"] for i in infos if i["site"] == s]
            cells = []
            for c in COLUMNS:
                vals = [r[c] for r in rows if r.get(c) is not None]
                cells.append(f"{np.median(vals):8.0f}" if vals else f"{'-':>8s}")
            lo, hi = get_profile(s).expected_hu(Tissue.PANCREAS)
            print(f"  {s:16s} {get_profile(s).phase:10s} " + " ".join(cells) + f"   [{lo:.0f}, {hi:.0f}]")
        noise = {s: np.median([i["noise_hu"] for i in infos if i["site"] == s]) for s in sites}
        print("\ndrawn noise std (HU): " + ", ".join(f"{s} {v:.1f}" for s, v in noise.items()))
    finally:
        if args.keep is None:
            shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
