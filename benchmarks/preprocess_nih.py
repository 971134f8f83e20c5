"""Time and peak memory of preprocessing the NIH Pancreas-CT scan (512x512x240 int16, LAI).

Runs ``preprocess_transforms`` step by step on ``shared/data/real/nih_pancreas_ct_0001`` (NIH
Pancreas-CT, Roth et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU, CC BY), then reads the
same case through the on-disk cache (written to a temporary folder) to compare a cache hit.

    python benchmarks/preprocess_nih.py [--data ../shared/data] [--spacing 1.5,1.5,2.0] [--repeats 2]

Peak memory is the process's ``ru_maxrss`` high-water mark, minus the mark after imports.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--spacing", default="1.5,1.5,2.0", help="target spacing in mm (X,Y,Z)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from dualssl.config import DataConfig
    from dualssl.data.cache import cached_dataset
    from dualssl.data.datalist import Case
    from dualssl.data.transforms import preprocess_transforms

    folder = args.data / "real" / "nih_pancreas_ct_0001"
    if not (folder / "ct.nii.gz").is_file():
        print(f"{folder / 'ct.nii.gz'}: not found; pass --data pointing at shared/data", file=sys.stderr)
        return 2
    case = Case("nih_0001", str(folder / "ct.nii.gz"), str(folder / "pancreas.nii.gz"), "nih")
    cfg = DataConfig(spacing=tuple(float(s) for s in args.spacing.split(",")))
    torch.set_num_threads(1)  # comparable on a shared machine; a cached trial needs no more
    base = rss_mb()

    pipeline = preprocess_transforms(cfg)
    totals: dict[str, float] = {}
    walls = []
    for _ in range(args.repeats):
        data: object = case.as_dict()
        start = time.perf_counter()
        for step in pipeline.transforms:
            t0 = time.perf_counter()
            data = step(data)
            name = type(step).__name__
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        walls.append(time.perf_counter() - start)
    out = data  # type: ignore[assignment]
    peak = rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        ds = cached_dataset([case], cfg, cache_dir=tmp)
        t0 = time.perf_counter()
        ds[0]
        miss = time.perf_counter() - t0
        t0 = time.perf_counter()
        hit = ds[0]
        hit_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.pt")) / 2**20
        assert torch.equal(hit["image"], out["image"])

    print(f"NIH 0001 512x512x240 int16 LAI 0.86x0.86x1.0 mm -> {tuple(out['image'].shape[1:])} at "
          f"{cfg.spacing} mm (torch threads: 1, repeats: {args.repeats})")
    print(f"preprocess wall time: {min(walls):.2f} s (best), {sum(walls) / len(walls):.2f} s (mean)")
    for name, seconds in totals.items():
        print(f"  {name:>22s}  {seconds / args.repeats:6.2f} s")
    print(f"peak RSS: {peak:.0f} MB ({peak - base:.0f} MB above the {base:.0f} MB after imports)")
    print(f"cache: miss {miss:.2f} s, hit {hit_s:.3f} s, file {size:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
