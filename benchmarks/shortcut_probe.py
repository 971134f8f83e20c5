"""Label-shortcut probe: does a corrupted ground-truth band help the trained net find the boundary?

Trains the demo recipe with both SSL branches (``dualssl.recipes.SCALES["demo"]`` + ``ARMS["dual"]``,
100 steps) on a phantom it generates (sites pv_standard, native_thick, cone_beam; 5 cases each,
scale 0.3), or takes ``--checkpoint``. Then, for the source validation cases and an unseen site, it
reports the mean whole-volume Dice (preprocessed grid) of the net's prediction on

* ``clean``: the image as it is;
* ``gt_band``: the image with r of the GROUND-TRUTH boundary band corrupted (the training corruption,
  whole volume, ``loss.band_mm``), for each r;
* ``control``: the same corruption of the band of the label shifted ``--shift-mm`` (default 18 mm)
  along ``--shift-axis`` (default y, across the gland), i.e. away from the boundary.

If training had taught the net to read the boundary from where the noise is, ``gt_band`` would beat
``control``; the design holds while ``gt_band - control <= --tolerance``. Prints a table, writes JSON.

    python benchmarks/shortcut_probe.py --out /tmp/shortcut_probe
    python benchmarks/shortcut_probe.py --checkpoint run/checkpoint_best.pt --ratios 0.2,0.5,0.8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config  # noqa: E402
from dualssl.data.cache import cached_dataset  # noqa: E402
from dualssl.data.datalist import load_datalist, split_cases  # noqa: E402
from dualssl.data.phantom import generate_dataset  # noqa: E402
from dualssl.engine import CheckpointSaver, fit, load_checkpoint  # noqa: E402
from dualssl.evaluation.inference import Predictor  # noqa: E402
from dualssl.losses.restoration import corrupt_region  # noqa: E402
from dualssl.models import SegmentationNet  # noqa: E402
from dualssl.models.factory import build_model  # noqa: E402
from dualssl.recipes import ARMS, SCALES  # noqa: E402

SITES = ["pv_standard", "native_thick", "cone_beam"]


def shifted(label: torch.Tensor, voxels: int, axis: int) -> torch.Tensor:
    """``label (1, 1, X, Y, Z)`` moved by ``voxels`` along spatial ``axis`` (0..2), zero-filled (no wrap)."""
    dim = axis + 2
    n = label.shape[dim]
    out = torch.zeros_like(label)
    if abs(voxels) < n:
        src = label.narrow(dim, max(0, -voxels), n - abs(voxels))
        out.narrow(dim, max(0, voxels), n - abs(voxels)).copy_(src)
    return out


def dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of two bool masks; NaN when both are empty."""
    total = pred.sum() + label.sum()
    return float(2 * (pred & label).sum() / total) if total > 0 else float("nan")


def probe_case(predictor: Predictor, item: dict, cfg: Config, ratios: list[float], shift_vox: int,
               axis: int, seed: int) -> dict[str, float]:
    """Dice on one preprocessed case under every condition."""
    plain = lambda t: t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)  # noqa: E731 (no MetaTensor)
    image = plain(item["image"]).float()[None]  # (1, 1, X, Y, Z)
    label = (plain(item["label"]) > 0.5)[None]
    row = {"clean": dice(predictor.predict_volume(image[0]).bool()[None], label)}
    moved = shifted(label.float(), shift_vox, axis)
    for r in ratios:
        for name, band_of in (("gt_band", label.float()), ("control", moved)):
            torch.manual_seed(seed)  # the same corruption draws for both conditions
            corrupted = corrupt_region(image, band_of, cfg.data.spacing, ratio=r, band_mm=cfg.loss.band_mm, crop=1.0)
            pred = predictor.predict_volume(corrupted.image[0]).bool()[None]
            row[f"{name}@{r:g}"] = dice(pred, label)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dualssl_shortcut_probe"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="skip training, probe this checkpoint")
    parser.add_argument("--epochs", type=int, default=None, help="override the demo's epochs (x10 steps)")
    parser.add_argument("--ratios", default="0.2,0.5,0.8")
    parser.add_argument("--shift-mm", type=float, default=18.0)
    parser.add_argument("--shift-axis", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--unseen", default="cone_beam")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=2022)
    args = parser.parse_args(argv)

    root = args.out / "phantom"
    if not (root / "dataset.json").is_file():
        generate_dataset(root, sites=SITES, cases_per_site=5, seed=0, scale=0.3)
    cfg = Config().with_overrides({**SCALES["demo"], **ARMS["dual"], "optim.seed": args.seed})
    if args.epochs:
        cfg.optim.epochs = args.epochs
    cfg.data.root, cfg.data.source_sites = str(root), [SITES[0]]
    start = time.perf_counter()
    if args.checkpoint is None:
        run = args.out / "run"
        result = fit(cfg, callbacks=[CheckpointSaver(run)])
        args.checkpoint = run / "checkpoint_best.pt"
        print(f"trained {cfg.optim.epochs * cfg.optim.steps_per_epoch} steps in {time.perf_counter() - start:.0f} s, "
              f"best val_dice {result.best_metric:.4f} at epoch {result.best_epoch}", flush=True)
    state = load_checkpoint(args.checkpoint)
    cfg = Config.from_dict(state["config"])
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    predictor = Predictor(SegmentationNet(net).eval(), cfg, device="cpu")
    split = split_cases(load_datalist(Path(cfg.data.root)), cfg.data.source_sites, cfg.data.val_fraction,
                        cfg.data.split_seed)
    ratios = [float(r) for r in args.ratios.split(",")]
    shift_vox = int(round(args.shift_mm / cfg.data.spacing[args.shift_axis]))
    groups = {"source_val": list(split.val), f"unseen_{args.unseen}": list(split.test[args.unseen])}
    table: dict[str, dict[str, float]] = {}
    for group, cases in groups.items():
        items = cached_dataset(cases, cfg.data)
        rows = [probe_case(predictor, items[i], cfg, ratios, shift_vox, args.shift_axis, args.seed + i)
                for i in range(len(items))]
        table[group] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        table[group]["cases"] = len(rows)
    verdict = {g: {f"{r:g}": round(t[f"gt_band@{r:g}"] - t[f"control@{r:g}"], 4) for r in ratios}
               for g, t in table.items()}
    holds = all(d <= args.tolerance for v in verdict.values() for d in v.values())
    report = {"checkpoint": str(args.checkpoint), "shift_mm": args.shift_mm, "shift_axis": args.shift_axis,
              "shift_voxels": shift_vox, "ratios": ratios, "mean_dice": table,
              "gt_minus_control": verdict, "tolerance": args.tolerance, "design_holds": holds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shortcut_probe.json").write_text(json.dumps(report, indent=2))
    print(f"mean whole-volume Dice; control = band shifted {args.shift_mm:g} mm ({shift_vox} voxels) "
          f"along axis {args.shift_axis}")
    print("| group | cases | clean | " + " | ".join(f"gt r={r:g} | control r={r:g} | gt-ctrl" for r in ratios)
          + " |\n|---|---|---|" + "---|---|---|" * len(ratios))
    for group, t in table.items():
        cells = [f"{t[f'gt_band@{r:g}']:.4f} | {t[f'control@{r:g}']:.4f} | {verdict[group][f'{r:g}']:+.4f}"
                 for r in ratios]
        print(f"| {group} | {t['cases']} | {t['clean']:.4f} | " + " | ".join(cells) + " |")
    print(f"design holds (GT band no better than control by more than {args.tolerance}): {holds}")
    return report


if __name__ == "__main__":
    main()
