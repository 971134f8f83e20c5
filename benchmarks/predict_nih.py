"""End-to-end prediction of the real NIH scan: ``dualssl predict`` against a plain MONAI pipeline.

Both run the same network (a freshly built net of the recipe's widths, exported with
``dualssl.export.export_model``; seeded, so every run holds the same weights) on
``shared/data/real/nih_pancreas_ct_0001/ct.nii.gz`` (NIH Pancreas-CT PANCREAS_0001, 512x512x240 int16,
LAI; Roth et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU, CC BY) with the same settings: window
``data.patch_size``, ``eval.sw_overlap``, Gaussian blending, ``eval.sw_batch_size``, the same body crop
and HU window, flip TTA (8 flips) off and on, softmax blended, back to the input grid, uint8 mask.

* **dualssl**: ``dualssl.evaluation.run.predict_paths`` (what ``dualssl predict --model DIR`` runs);
  stages: preprocess (load, RAS, resample, crop, window), sliding window (+TTA), back (resample of
  the foreground probabilities onto the input grid, argmax, largest components), write.
* **monai**: ``LoadImaged`` -> ``Orientationd`` -> ``Spacingd`` -> ``CropForegroundd`` ->
  ``ScaleIntensityRanged`` -> ``sliding_window_inference`` (softmax per window) -> ``Invertd`` (the
  probabilities back onto the input grid) -> argmax -> ``KeepLargestConnectedComponent`` ->
  ``SaveImage``: the textbook MONAI inference script.

Each run is its own process (``--child``), so time includes interpreter start and imports, and peak
memory is the peak over the run of the summed PSS (``/proc/<pid>/smaps_rollup``) of the process
tree, sampled every 0.1 s. Runs are interleaved ABBA per TTA setting; the best of the runs (and of
each stage) is reported, since a shared machine's load only ever adds time.
``ratio`` = monai time / dualssl time (goal >= 1).

    python benchmarks/predict_nih.py                 # TTA off and on, 2 repeats (ABBA)
    python benchmarks/predict_nih.py --tta off --repeats 1 --recipe demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NIH_SCAN = Path("real") / "nih_pancreas_ct_0001" / "ct.nii.gz"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tree_memory import TreeMemory  # noqa: E402  (summed PSS of a process tree)

# --- the two pipelines (run in a child process) -----------------------------------------------------------

class Stages:
    """Wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


def run_dualssl(model_dir: Path, scan: Path, out: Path, tta: bool) -> dict[str, Any]:
    import nibabel as nib

    from dualssl.evaluation import run as run_module
    from dualssl.evaluation.inference import Predictor
    from dualssl.export import load_model

    stages = Stages()
    t0 = time.perf_counter()
    predictor = Predictor(*load_model(model_dir))
    stages.seconds["load model"] = time.perf_counter() - t0
    # timing wrappers on this instance only: predict_file itself is the library's
    predictor._preprocess = stages.wrap("preprocess", predictor.preprocess)
    predictor.predict_probs = stages.wrap("sliding window", predictor.predict_probs)  # type: ignore[method-assign]
    predictor.predict_file = stages.wrap("predict_file", predictor.predict_file)  # type: ignore[method-assign]
    save = nib.save
    run_module.nib.save = stages.wrap("write", save)  # type: ignore[attr-defined]
    try:
        run_module.predict_paths(predictor, [scan], out, tta=tta)
    finally:
        run_module.nib.save = save  # type: ignore[attr-defined]
    s = stages.seconds
    s["back"] = s.pop("predict_file") - s["preprocess"] - s["sliding window"]
    return s


def run_monai(model_dir: Path, scan: Path, out: Path, tta: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, Invertd,
                                  KeepLargestConnectedComponent, LoadImaged, Orientationd, SaveImage,
                                  ScaleIntensityRanged, Spacingd)

    from dualssl.data.transforms import BODY_HU, CROP_MARGIN
    from dualssl.export import load_model

    stages = Stages()
    t0 = time.perf_counter()
    model, cfg = load_model(model_dir)
    stages.seconds["load model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    low, high = cfg.data.hu_window
    pre = Compose([
        LoadImaged("image", image_only=False),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=tuple(cfg.data.spacing), mode="bilinear"),
        CropForegroundd("image", source_key="image", select_fn=lambda x: x > BODY_HU, margin=CROP_MARGIN,
                        allow_smaller=True),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ])
    data = pre({"image": str(scan)})
    stages.seconds["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = data["image"][None].float()
    flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [])

    def softmax_model(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(batch), dim=1)

    with torch.inference_mode():
        probs = None
        for axes in flips:
            xi = torch.flip(x, axes) if axes else x
            p = sliding_window_inference(xi, tuple(cfg.data.patch_size), cfg.eval.sw_batch_size, softmax_model,
                                         overlap=cfg.eval.sw_overlap, mode="gaussian")
            p = torch.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
        probs = probs / len(flips)
    stages.seconds["sliding window"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data["pred"] = probs[0]  # a MetaTensor carrying the image's meta and applied operations
    data = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(data)
    labels = torch.argmax(data["pred"], dim=0, keepdim=True).to(torch.uint8)
    if cfg.eval.keep_largest:
        labels = KeepLargestConnectedComponent(applied_labels=[1], num_components=1)(labels)
    stages.seconds["back"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    writer = SaveImage(output_dir=str(out.parent), output_postfix="", output_ext=".nii.gz", separate_folder=False,
                       output_dtype=np.uint8, resample=False, print_log=False)
    writer(labels, meta_data=data["pred"].meta, filename=str(out.parent / out.name.replace(".nii.gz", "")))
    stages.seconds["write"] = time.perf_counter() - t0
    return stages.seconds


def child(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import dualssl.evaluation.run  # noqa: F401
    import monai.inferers  # noqa: F401
    imports = time.perf_counter() - t0
    fn = run_dualssl if args.child == "dualssl" else run_monai
    stages = fn(args.model_dir, args.scan, args.out, args.tta == "on")
    stages["imports"] = imports
    print("STAGES " + json.dumps(stages))
    return 0


# --- the driver ------------------------------------------------------------------------------------------

def export_fresh_model(recipe: str, out: Path, seed: int) -> Path:
    import torch

    from dualssl.export import export_model
    from dualssl.models.factory import build_model
    from dualssl.recipes import recipe_config

    cfg = recipe_config(recipe)
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    return export_model({"config": cfg.to_dict(), "model": net.state_dict()}, out, torchscript=False)


def launch(kind: str, model_dir: Path, scan: Path, out: Path, tta: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model-dir", str(model_dir),
           "--scan", str(scan), "--out", str(out), "--tta", tta]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreeMemory(proc.pid, every_s=0.1) as meter:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    peak = meter.peak_bytes / 1024.0
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} (tta {tta}) failed with code {proc.returncode}:\n{stderr[-3000:]}")
    line = next(ln for ln in stdout.splitlines() if ln.startswith("STAGES "))
    return {"wall": wall, "pss_mib": peak / 1024.0, "stages": json.loads(line[len("STAGES "):])}


def mask_stats(a: Path, b: Path) -> tuple[float, float, float]:
    """(ml of a, ml of b, Dice of a vs b)."""
    import nibabel as nib
    import numpy as np

    ia, ib = nib.load(a), nib.load(b)
    ma, mb = np.asanyarray(ia.dataobj) != 0, np.asanyarray(ib.dataobj).reshape(ia.shape) != 0
    ml = float(np.prod(nib.affines.voxel_sizes(ia.affine))) / 1000.0
    inter, total = float((ma & mb).sum()), float(ma.sum() + mb.sum())
    return float(ma.sum()) * ml, float(mb.sum()) * ml, (2 * inter / total if total else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--tta", default="off,on", help="off, on or off,on")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each pipeline per TTA setting (ABBA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["dualssl", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    scan = args.data / NIH_SCAN
    if not scan.is_file():
        print(f"{scan}: not found; pass --data pointing at shared/data", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualssl-predict-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = export_fresh_model(args.recipe, tmp / "model", args.seed)
        for tta in args.tta.split(","):
            runs: dict[str, list[dict[str, Any]]] = {"dualssl": [], "monai": []}
            order = [k for i in range(args.repeats) for k in (("dualssl", "monai") if i % 2 == 0
                                                               else ("monai", "dualssl"))]
            outs = {k: tmp / f"{k}-{tta}.nii.gz" for k in runs}
            for kind in order:
                runs[kind].append(launch(kind, model_dir, scan, outs[kind], tta))
                r = runs[kind][-1]
                print(f"  tta {tta} {kind}: {r['wall']:.1f} s, peak PSS {r['pss_mib']:.0f} MiB, "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()), flush=True)
            ml_d, ml_m, dice = mask_stats(outs["dualssl"], outs["monai"])
            row: dict[str, Any] = {"tta": tta, "ml_dualssl": ml_d, "ml_monai": ml_m, "dice": dice}
            for kind, rs in runs.items():
                # best of the runs: on a shared machine a load spike only ever adds time
                row[kind] = {"wall": min(r["wall"] for r in rs), "pss": max(r["pss_mib"] for r in rs),
                             "stages": {k: min(r["stages"][k] for r in rs) for k in rs[0]["stages"]}}
            rows.append(row)

    from dualssl.recipes import recipe_config

    cfg = recipe_config(args.recipe)
    print(f"\nNIH 0001 512x512x240, recipe {args.recipe}: widths {tuple(cfg.model.widths)}, spacing "
          f"{tuple(cfg.data.spacing)} mm, window {tuple(cfg.data.patch_size)}, overlap {cfg.eval.sw_overlap}, "
          f"sw batch {cfg.eval.sw_batch_size}, gaussian; {args.repeats} runs each (ABBA), best run and best stage times, peak PSS the max; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    stages = ["imports", "load model", "preprocess", "sliding window", "back", "write"]
    header = f"{'tta':4} {'pipeline':8} {'total s':>8} " + " ".join(f"{s:>14}" for s in stages) + f" {'peak PSS MiB':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for kind in ("dualssl", "monai"):
            r = row[kind]
            print(f"{row['tta']:4} {kind:8} {r['wall']:>8.1f} "
                  + " ".join(f"{r['stages'].get(s, float('nan')):>14.2f}" for s in stages) + f" {r['pss']:>13.0f}")
        ratio = row["monai"]["wall"] / row["dualssl"]["wall"]
        mem = row["monai"]["pss"] / row["dualssl"]["pss"]
        print(f"{row['tta']:4} ratio monai/dualssl: time {ratio:.2f} (goal >= 1), peak PSS {mem:.2f}; masks "
              f"{row['ml_dualssl']:.1f} ml vs {row['ml_monai']:.1f} ml, Dice between them {row['dice']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
