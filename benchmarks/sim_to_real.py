"""Sim-to-real transfer: train on phantom sites only, segment the real NIH scan, measure.

    python benchmarks/sim_to_real.py --out /tmp/s2r                       # procedural phantom
    python benchmarks/sim_to_real.py --out /tmp/s2r_c --preset clinical   # the clinical phantom preset
    python benchmarks/sim_to_real.py --out /tmp/s2r_g --preset clinical --set data.domain_aug=gin
    python benchmarks/sim_to_real.py --out /tmp/s2r_bank --shape-bank ../shared/data/labels/msd_task07_pancreas
    python benchmarks/sim_to_real.py --out /tmp/s2r --reference           # + the recipe fit to the NIH scan itself
    python benchmarks/sim_to_real.py --out /tmp/quick --steps 60 --cases-per-site 3 --scale 0.3   # a short run

Recipe (documented in docs/PHANTOM.md, "Sim-to-real transfer"): the ``demo`` scale of
``dualssl/recipes.py`` (8-16-32-64 net, 3x3x4 mm voxels, 48x48x32 patches, lr 3e-3) with the standard
augmentation on (``data.augment=true``), the plain loss (``loss.lambda_con = loss.lambda_rec = 0``:
the benchmark measures the data, not the method), ``--steps`` optimiser steps (default 400, in epochs of
20 steps), the best checkpoint chosen on whole phantom validation volumes (no peeking at the real scan).

It then exports that checkpoint as a model folder (``dualssl.export.export_model``, what
``studies/export_best.py`` writes), runs ``dualssl predict --model DIR/model`` in a subprocess on the
real scans, and writes ``DIR/sim_to_real.json`` and ``DIR/sim_to_real.png``:

* NIH Pancreas-CT PANCREAS_0001 (manual label): Dice, HD95, predicted and true volume, centroid distance,
  and graded measures of the foreground probability (soft Dice, AUROC, mean probability inside the label)
  that still rank phantoms when every hard mask scores Dice 0;
* the TotalSegmentator example (second scanner, native phase, 3 mm): Dice against the TotalSegmentator
  PREDICTION, i.e. agreement with a model, not accuracy.

``--reference`` trains the same recipe on the NIH scan itself (a one-case list: the scan trains and, as a
second entry, validates) and scores it on that very scan: a training-set score (how well the budget
fits one scan), never what the budget reaches on real CT it has not seen (a model trained that way
scored Dice 0.02 on another scan of the same hospital, issue 25). Its JSON entry says so
(``scored_on``) and keeps its NIH numbers under ``nih_training_scan``, not ``nih``. Data: NIH Pancreas-CT, Roth et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU, CC BY.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from dualssl.cli import add_phantom_option_flags, phantom_options_from_args  # noqa: E402
from dualssl.config import Config  # noqa: E402
from dualssl.recipes import SCALES  # noqa: E402

NIH = Path("real/nih_pancreas_ct_0001")
TS = Path("real/totalsegmentator_example")
ATTRIBUTION = "NIH Pancreas-CT, Roth et al., TCIA, CC BY"
DEFAULT_SITES = "pv_standard,pancreatic_thin,lowdose_sharp,ir_smooth"


def recipe(scale: str, steps: int, steps_per_epoch: int, seed: int) -> dict:
    """The benchmark's dotted overrides: ``scale`` + augmentation on, plain loss, ``steps`` steps."""
    epochs = max(1, round(steps / steps_per_epoch))
    return {**SCALES[scale], "data.augment": True, "loss.lambda_con": 0.0, "loss.lambda_rec": 0.0,
            "optim.steps_per_epoch": steps_per_epoch, "optim.epochs": epochs, "optim.seed": seed,
            "eval.val_every": 1, "eval.cheap_metric": "val_dice", "data.val_fraction": 0.4}


def train(root: Path, sites: list[str], overrides: dict, run: Path) -> tuple[Path, dict]:
    """Fit with the engine; export the best checkpoint to ``run/model``; returns (model dir, facts)."""
    from dualssl.engine import CheckpointSaver, fit
    from dualssl.export import export_model

    cfg = Config().with_overrides(overrides)
    cfg.data.root, cfg.data.source_sites = str(root), sites
    cfg.data.cache_dir = str(run.parent / "cache")
    start = time.perf_counter()
    result = fit(cfg, callbacks=[CheckpointSaver(run)])
    wall = time.perf_counter() - start
    facts = {"train_wall_s": round(wall, 1), "best_val_dice": round(float(result.best_metric), 4),
             "best_epoch": int(result.best_epoch), "epochs": cfg.optim.epochs,
             "steps": cfg.optim.epochs * cfg.optim.steps_per_epoch}
    model = export_model(run / "checkpoint_best.pt", run / "model",
                         metadata={"benchmark": "sim_to_real", "data_root": str(root), "source_sites": sites,
                                   **facts})
    return model, facts


def predict(model: Path, scan: Path, out: Path) -> Path:
    """``dualssl predict --model MODEL SCAN -o OUT`` as a user runs it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dualssl.cli", "predict", "--model", str(model), str(scan), "-o", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return None if not len(idx) else (affine[:3, :3] @ idx.mean(0) + affine[:3, 3])


def measure(pred_path: Path, label_path: Path) -> dict:
    """Dice, HD95 (mm), volumes (ml) and centroid distance (mm) of a prediction file against a label file."""
    from dualssl.evaluation.metrics import case_metrics

    lab_img = nib.load(label_path)
    label = np.asarray(lab_img.dataobj) > 0
    pred = np.asarray(nib.load(pred_path).dataobj) > 0
    spacing = [float(s) for s in lab_img.header.get_zooms()[:3]]
    m = case_metrics(pred.astype(np.uint8), label.astype(np.uint8), spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    cp, cl = _world_centroid(pred, lab_img.affine), _world_centroid(label, lab_img.affine)
    return {"dice": round(float(m["dice"]), 4), "hd95_mm": round(float(m["hd95"]), 1),
            "pred_ml": round(float(pred.sum() * voxel_ml), 1), "label_ml": round(float(label.sum() * voxel_ml), 1),
            "centroid_mm": None if cp is None else round(float(np.linalg.norm(cp - cl)), 1)}


def graded(model: Path, scan: Path, label_path: Path) -> dict:
    """Soft Dice, AUROC and mean probability inside the label of the net's foreground probability, on
    the net's own preprocessed grid (the label brought there by the same preprocessing, nearest
    neighbour): these still rank phantoms when every hard mask scores Dice 0."""
    from dualssl.data.transforms import preprocess_transforms
    from dualssl.evaluation.inference import Predictor
    from dualssl.evaluation.metrics import probability_metrics
    from dualssl.export import load_model

    net, cfg = load_model(model)
    case = preprocess_transforms(cfg.data)({"image": str(scan), "label": str(label_path)})
    prob = Predictor(net, cfg, "cpu").predict_probs(case["image"], tta=False)[1].numpy()
    return {k: round(v, 4) for k, v in probability_metrics(prob, case["label"][0].numpy() > 0).items()}


def appearance(root: Path | None, real: Path) -> dict:
    """Peri-pancreatic appearance at the recipe's resolution (``peripancreatic_appearance``) and the noise
    there (``noise_power_spectrum`` after the same linear resampling): the NIH scan, and the mean over
    the phantom's training cases (as stored: what the net sees), with the noise per site."""
    from dualssl.data.phantom.measure import peripancreatic_appearance

    def one(image: Path, label: Path) -> dict:
        img = nib.load(image)
        hu, spacing = np.asarray(img.dataobj, np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])
        return {**peripancreatic_appearance(hu, np.asarray(nib.load(label).dataobj), spacing),
                **grid_noise(hu, spacing)}

    out = {"nih": {k: round(v, 3) for k, v in one(real / NIH / "ct.nii.gz", real / NIH / "pancreas.nii.gz").items()}}
    if root is not None:
        cases = json.loads((root / "dataset.json").read_text())["training"]
        rows = [one(root / c["image"], root / c["label"]) for c in cases]
        out["phantom_mean"] = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
        out["phantom_cases"] = len(rows)
        sites = [c.get("site", "") for c in cases]
        out["phantom_noise_by_site"] = {
            site: {k: round(float(np.mean([r[k] for r, s in zip(rows, sites) if s == site])), 3)
                   for k in ("grid_noise_sd", "grid_noise_mean_freq")} for site in dict.fromkeys(sites)}
    return out


def grid_noise(hu: np.ndarray, spacing: tuple[float, float, float], grid_mm=(3.0, 3.0, 4.0)) -> dict:
    """Noise SD (HU) and the spectrum's mean frequency (1/mm) on the recipe's grid, resampled linearly
    as ``peripancreatic_appearance`` does (what the net sees of the scanner's noise)."""
    from scipy import ndimage

    from dualssl.data.phantom.measure import noise_power_spectrum

    zoomed = ndimage.zoom(hu, [s / g for s, g in zip(spacing, grid_mm)], order=1)
    nps = noise_power_spectrum(zoomed, grid_mm, roi_mm=24.0, bins=4)
    return {"grid_noise_sd": nps["noise_sd"], "grid_noise_mean_freq": nps["mean_freq_per_mm"]}


def evaluate_real(model: Path, real: Path, out: Path) -> dict:
    nih_pred = predict(model, real / NIH / "ct.nii.gz", out / "nih_pred.nii.gz")
    ts_pred = predict(model, real / TS / "ct.nii.gz", out / "ts_pred.nii.gz")
    ts = measure(ts_pred, real / TS / "pancreas_predicted.nii.gz")
    return {"nih": {**measure(nih_pred, real / NIH / "pancreas.nii.gz"),
                    **graded(model, real / NIH / "ct.nii.gz", real / NIH / "pancreas.nii.gz")},
            "totalseg_agreement": {"dice_vs_totalsegmentator_prediction": ts["dice"], "pred_ml": ts["pred_ml"],
                                   "totalsegmentator_ml": ts["label_ml"],
                                   "note": "agreement with a model's prediction, not accuracy"}}


REFERENCE_SCORED_ON = ("the very scan it trained on: a training-set score (how well this budget fits one scan), "
                       "not what it reaches on real CT it has not seen")
"""What ``--reference``'s numbers measure (in its JSON entry and its printed line)."""


def reference_record(facts: dict, scores: dict) -> dict:
    """The ``reference_run`` entry: ``facts`` of its training, ``scores`` from :func:`evaluate_real` with the
    NIH scores under ``nih_training_scan`` (the scan it trained and validated on) and ``scored_on``."""
    scores = dict(scores)
    return {**facts, "scored_on": REFERENCE_SCORED_ON, "nih_training_scan": scores.pop("nih"), **scores}


def figure(real: Path, rows: dict[str, Path], out: Path, z: int | None = None) -> None:
    """Axial NIH slice ``z`` (default: the largest label slice): manual label and each run's outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct = nib.as_closest_canonical(nib.load(real / NIH / "ct.nii.gz"))
    lab = np.asarray(nib.as_closest_canonical(nib.load(real / NIH / "pancreas.nii.gz")).dataobj) > 0
    largest = int(np.argmax(lab.sum((0, 1))))
    z = largest if z is None else int(z)
    img = np.asarray(ct.dataobj[:, :, z], np.float32)
    colours = ["tab:red", "tab:orange", "tab:cyan", "tab:purple"]
    fig, ax = plt.subplots(figsize=(7, 6))
    # RAS array: show with anterior up and patient right on the left (radiological view), cropped to
    # 90 pixels around the label in that view's rows and columns
    radiological = lambda a: np.flipud(a[::-1, :].T)  # noqa: E731
    rows_, cols_ = np.nonzero(radiological(lab[:, :, z]))
    box = (slice(max(rows_.min() - 90, 0), rows_.max() + 90), slice(max(cols_.min() - 90, 0), cols_.max() + 90))
    view = lambda a: radiological(a)[box]  # noqa: E731
    ax.imshow(view(img), cmap="gray", vmin=-160, vmax=240)
    ax.contour(view(lab[:, :, z].astype(float)), levels=[0.5], colors="lime", linewidths=1.5)
    handles = [plt.Line2D([], [], color="lime", label="manual label")]
    for (name, path), colour in zip(rows.items(), colours):
        pred = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj[:, :, z]) > 0
        if pred.any():
            ax.contour(view(pred.astype(float)), levels=[0.5], colors=colour, linewidths=1.2)
        handles.append(plt.Line2D([], [], color=colour, label=name))
    ax.legend(handles=handles, loc="upper left", fontsize=8)  # the air in front of the body
    ax.set_axis_off()
    ax.set_title(f"NIH PANCREAS_0001, axial slice {z}" + (" (largest label area)" if z == largest else ""), fontsize=9)
    fig.text(0.01, 0.01, f"Data: {ATTRIBUTION}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


SUMMARY_KEYS = ("dice", "hd95_mm", "pred_ml", "centroid_mm", "soft_dice", "auroc", "mean_prob_in_label")


def summarise_runs(runs: list[dict]) -> dict:
    """Mean, sample sd, min and max over the runs of each NIH figure (and of the phantom validation Dice)."""
    out = {}
    for key in ("best_val_dice",) + SUMMARY_KEYS:
        raw = [r[key] if key == "best_val_dice" else r["nih"][key] for r in runs]
        vals = np.array([np.nan if v is None else v for v in raw], float)   # no centroid: nothing predicted
        vals = vals[np.isfinite(vals)]
        if len(vals):
            out[key] = {"mean": round(float(vals.mean()), 4), "sd": round(float(vals.std(ddof=1)), 4) if len(vals) > 1
                        else None, "min": round(float(vals.min()), 4), "max": round(float(vals.max()), 4), "n": len(vals)}
    return out


def reference_list(real: Path, out: Path) -> Path:
    """A one-case list: the NIH scan (as two entries via symlinks in ``out``: one trains, one validates)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for tag in ("a", "b"):
        for name in ("ct", "pancreas"):
            link = out / f"nih_{tag}_{name}.nii.gz"
            if not link.exists():
                link.symlink_to((real / NIH / f"{name}.nii.gz").resolve())
        entries.append({"image": f"nih_{tag}_ct.nii.gz", "label": f"nih_{tag}_pancreas.nii.gz", "site": "nih",
                        "case_id": f"nih_{tag}"})
    (out / "dataset.json").write_text(json.dumps(entries, indent=1))
    return out / "dataset.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sites", default=DEFAULT_SITES, help="phantom training sites")
    parser.add_argument("--cases-per-site", type=int, default=6)
    parser.add_argument("--scale", type=float, default=0.5, help="phantom scale")
    parser.add_argument("--recipe", default="demo", choices=list(SCALES))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="train once per training seed (same phantom) and report each run and their mean and "
                             "sd: a single run cannot rank phantoms (CPU training is not bit-reproducible)")
    parser.add_argument("--shape-bank", type=Path, default=None, help="real pancreas masks for the phantom")
    add_phantom_option_flags(parser)
    parser.add_argument("--phantom", type=Path, default=None, help="reuse this phantom dataset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override on top of the recipe, e.g. data.domain_aug=gin; repeatable")
    parser.add_argument("--reference", action="store_true", help="also train the recipe on the NIH scan")
    parser.add_argument("--no-phantom-run", action="store_true", help="only the --reference run")
    args = parser.parse_args(argv)
    if not (args.real / NIH / "ct.nii.gz").is_file():
        parser.error(f"{args.real / NIH}: the real NIH scan is absent; pass --real SHARED_DATA")
    args.out.mkdir(parents=True, exist_ok=True)
    sites = [s for s in args.sites.split(",") if s]
    overrides = recipe(args.recipe, args.steps, args.steps_per_epoch, args.seed)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 2022,1,2")
    for item in args.set:
        key, _, value = item.partition("=")
        if not key or not _:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. data.domain_aug=gin")
        overrides[key.strip()] = value.strip()
    Config().with_overrides(dict(overrides)).validate()     # a bad key or value fails here, before any work
    options = phantom_options_from_args(args)
    report: dict = {"recipe": {"scale": args.recipe, **overrides},
                    "phantom": {"sites": sites, "cases_per_site": args.cases_per_site, "scale": args.scale,
                                "shape_bank": str(args.shape_bank) if args.shape_bank else None,
                                "options": dataclasses.asdict(options)},
                    "load_average": os.getloadavg()[0]}
    preds: dict[str, Path] = {}
    if not args.no_phantom_run:
        root = args.phantom or args.out / "phantom"
        if not (root / "dataset.json").is_file():
            from dualssl.data.phantom import generate_dataset

            start = time.perf_counter()
            generate_dataset(root, sites=sites, cases_per_site=args.cases_per_site, seed=0, scale=args.scale,
                             shape_bank=args.shape_bank, options=options)
            report["phantom"]["generate_s"] = round(time.perf_counter() - start, 1)
        report["appearance"] = appearance(root, args.real)
        print(json.dumps({"appearance": report["appearance"]}), flush=True)
        runs = []
        for seed in seeds:
            tag = "" if len(seeds) == 1 else f"_s{seed}"
            model, facts = train(root, sites, {**overrides, "optim.seed": seed}, args.out / f"run{tag}")
            runs.append({"seed": seed, **facts, **evaluate_real(model, args.real, args.out / f"pred{tag}")})
            preds[f"trained on phantom{' (seed %d)' % seed if tag else ''}"] = args.out / f"pred{tag}" / "nih_pred.nii.gz"
            print(json.dumps(runs[-1]), flush=True)
        report["phantom_run"] = runs[0]
        if len(runs) > 1:
            report["phantom_runs"] = runs
            report["phantom_summary"] = summarise_runs(runs)
            print(json.dumps({"phantom_summary": report["phantom_summary"]}), flush=True)
    if args.reference:
        ref_root = reference_list(args.real, args.out / "nih_list")
        model, facts = train(ref_root, ["nih"], overrides, args.out / "reference")
        report["reference_run"] = reference_record(facts, evaluate_real(model, args.real, args.out / "reference_pred"))
        preds["trained on this very scan (reference)"] = args.out / "reference_pred" / "nih_pred.nii.gz"
        print(json.dumps(report["reference_run"]), flush=True)
        print(f"reference: NIH Dice {report['reference_run']['nih_training_scan'].get('dice', float('nan')):.3f}, "
              f"scored on {REFERENCE_SCORED_ON}", flush=True)
    (args.out / "sim_to_real.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    figure(args.real, preds, args.out / "sim_to_real.png")
    print(f"wrote {args.out / 'sim_to_real.json'} and {args.out / 'sim_to_real.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
