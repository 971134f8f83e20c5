"""Small cross-site comparison on CPU: full dual-SSL model vs the plain U-Net (both lambdas 0).

Trains each on the phantom's source site with the settings of ``tests/test_learning.py`` and
evaluates the best checkpoint on the source validation cases and on two unseen sites (metrics in the
input's own geometry). A few minutes per model on 2 cores:

    python benchmarks/cross_site_small.py --out /tmp/cross_site --seeds 1,2,3

With several seeds it ends with the mean +- std (sample std, n-1) across seeds of each model's
per-site mean Dice, and writes that summary to ``cross_site_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config  # noqa: E402
from dualssl.data.datalist import load_datalist, split_cases  # noqa: E402
from dualssl.data.phantom import generate_dataset  # noqa: E402
from dualssl.engine import CheckpointSaver, fit, load_checkpoint  # noqa: E402
from dualssl.evaluation.inference import Predictor  # noqa: E402
from dualssl.evaluation.run import evaluate_cases  # noqa: E402
from dualssl.models import SegmentationNet  # noqa: E402
from dualssl.models.factory import build_model  # noqa: E402
from dualssl.recipes import SCALES  # noqa: E402

LEARNING = dict(SCALES["learning"])

SITES = ["pv_standard", "native_thick", "cone_beam"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dualssl_cross_site"))
    parser.add_argument("--cases-per-site", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--seeds", default="2022")
    args = parser.parse_args()

    root = args.out / "phantom"
    if not (root / "dataset.json").is_file():
        generate_dataset(root, sites=SITES, cases_per_site=args.cases_per_site, seed=0, scale=args.scale)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, lambdas in (("dual-ssl", {}), ("baseline", {"loss.lambda_con": 0, "loss.lambda_rec": 0})):
            cfg = Config().with_overrides({**LEARNING, **lambdas, "optim.seed": seed})
            cfg.data.root, cfg.data.source_sites = str(root), [SITES[0]]
            run = args.out / f"{name}_{seed}"
            start = time.perf_counter()
            result = fit(cfg, callbacks=[CheckpointSaver(run)])
            train_s = time.perf_counter() - start
            state = load_checkpoint(run / "checkpoint_best.pt")
            net = build_model(cfg.model)
            net.load_state_dict(state["model"])
            split = split_cases(load_datalist(root), cfg.data.source_sites, cfg.data.val_fraction,
                                cfg.data.split_seed)
            cases = list(split.val) + [c for site in SITES[1:] for c in split.test[site]]
            summary = evaluate_cases(Predictor(SegmentationNet(net), cfg), cases, cfg, run / "eval",
                                     cfg.data.source_sites)
            row = {"model": name, "seed": seed, "train_s": round(train_s, 1),
                   "val_dice(selection)": round(result.best_metric, 4)}
            for site, stats in summary["per_site"].items():
                row[f"{site}_dice"] = round(stats["dice_mean"], 4)
                row[f"{site}_hd95"] = round(stats["hd95_mean"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "cross_site.json").write_text(json.dumps(rows, indent=2))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    summary = summarise_seeds(rows)
    (args.out / "cross_site_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nmean +- std across seeds {args.seeds} (per-site mean Dice of each run):")
    print("| site | " + " | ".join(summary) + " |\n|---|" + "---|" * len(summary))
    sites = [k[:-len("_dice")] for k in keys if k.endswith("_dice")]
    for site in sites:
        cells = [f"{v[site]['mean']:.4f} +- {v[site]['std']:.4f} (n={v[site]['n']})" for v in summary.values()]
        print(f"| {site} | " + " | ".join(cells) + " |")
    return 0


def summarise_seeds(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {site: {mean, std, n}}}`` of the per-site mean Dice across seeds (std 0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]
        out[model] = {}
        for key in (k for k in runs[0] if k.endswith("_dice")):
            values = [r[key] for r in runs]
            out[model][key[:-len("_dice")]] = {"mean": statistics.fmean(values), "n": len(values),
                                               "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


if __name__ == "__main__":
    sys.exit(main())
