"""The ``dualssl`` command: phantom, verify-dataset, fingerprint, train, evaluate, predict.

Each subcommand parses its flags here and calls one library function; imports are lazy so
that ``dualssl --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualssl.data.phantom.options import PhantomOptions


def add_phantom_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and the ``PhantomOptions`` field flags (shared with benchmarks/sim_to_real.py)."""
    # the choices are checked by PhantomOptions, whose errors name the field and its values
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="phantom preset (dualssl.data.phantom.options.PRESETS): default, or clinical (long "
                             "coverage, bowel packed around a lean pancreas); the flags below override its fields")
    parser.add_argument("--coverage", default=None,
                        help="cranio-caudal extent: abdomen (default: kidney poles to liver dome) or long (lung "
                             "bases to iliac crests, as a clinical abdominal scan)")
    parser.add_argument("--fov", default=None,
                        help="in-plane field of view: body (default: cropped to the body) or scanner (the "
                             "reconstructed square, with air and the table)")
    parser.add_argument("--context", default=None,
                        help="around the pancreas: fat (default: a fat plane) or packed (bowel loops abut it)")
    parser.add_argument("--pancreas-fat", type=float, default=None, metavar="FACTOR",
                        help="factor on the site's interlobular fat of the pancreas (default 1; 0 = a lean gland)")


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """``--plan`` and its budget (shared with the studies)."""
    parser.add_argument("--plan", choices=("none", "auto"), default="none",
                        help="auto: set data.spacing, data.hu_window and data.patch_size from the source site's "
                             "fingerprint (dualssl/data/plan.py; the reasons are printed); none (default): the config's")
    parser.add_argument("--plan-memory-gb", type=float, default=None,
                        help="--plan auto: training memory per device the patch must fit (default: "
                             "dualssl.data.plan.DEFAULT_MEMORY_GB, 8)")
    parser.add_argument("--plan-workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help=argparse.SUPPRESS)


def phantom_options_from_args(args: argparse.Namespace) -> "PhantomOptions":
    """The ``PhantomOptions`` of the flags above: the preset with the given fields overridden."""
    from dualssl.data.phantom.options import phantom_options

    return phantom_options(args.preset, coverage=args.coverage, fov=args.fov, context=args.context,
                           pancreas_fat=args.pancreas_fat)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from dualssl.data.phantom import generate_dataset, generate_sweep_dataset
    from dualssl.data.phantom.sweeps import parse_sweep_spec

    options = phantom_options_from_args(args)

    if args.sweep:
        if args.sites:
            raise ValueError("--sites and --sweep: give one of them (a sweep writes --sweep-base and "
                             "one site per swept value)")
        sweeps: dict[str, list] = {}
        for spec in args.sweep:
            axis, values = parse_sweep_spec(spec)
            sweeps.setdefault(axis, []).extend(values)
        root = generate_sweep_dataset(args.out, sweeps, cases_per_site=args.cases_per_site, seed=args.seed,
                                      scale=args.scale, base=args.sweep_base, workers=args.workers,
                                      shape_bank=args.shape_bank, options=options)
    else:
        sites = [s for s in args.sites.split(",") if s] if args.sites else None
        root = generate_dataset(args.out, sites=sites, cases_per_site=args.cases_per_site,
                                seed=args.seed, scale=args.scale, workers=args.workers,
                                shape_bank=args.shape_bank, options=options)
    print(f"phantom dataset written to {root}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from dualssl.data.verify import verify_dataset

    problems = verify_dataset(args.root)
    for p in problems:
        print(p)
    fatal = [p for p in problems if p.fatal]
    print(f"{len(problems)} problem(s), {len(fatal)} fatal" if problems else f"{args.root}: no problems found")
    return 1 if fatal else 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from dualssl.data.datalist import load_datalist
    from dualssl.data.fingerprint import fingerprint_cases, site_differences, summarise_sites
    from dualssl.data.fingerprint_io import site_table, write_fingerprint

    cases = load_datalist(args.data)
    rows = fingerprint_cases(cases, workers=args.workers,
                             progress=lambda i, n: print(f"\r[fingerprint] {i}/{n} cases", end="", file=sys.stderr))
    print(file=sys.stderr)
    summary = summarise_sites(rows)
    source = args.source or None
    differences = site_differences(summary, source) if source else {}
    print(site_table(summary, differences, source))
    if args.out:
        for kind, path in write_fingerprint(args.out, rows, summary, differences, source).items():
            print(f"{kind}: {path}")
    return 0


def plan_config(cfg, data: Path, memory_gb: float | None, out: Path | None = None, workers: int = 1):
    """``--plan auto``: fingerprint the source site(s) of ``data``, set spacing, HU window and patch size
    (:mod:`dualssl.data.plan`), print the reasons and write ``plan.json`` (and the fingerprint) to ``out``."""
    import json

    from dualssl.data.datalist import load_datalist
    from dualssl.data.fingerprint import fingerprint_cases, summarise_sites
    from dualssl.data.fingerprint_io import write_fingerprint
    from dualssl.data.plan import DEFAULT_MEMORY_GB, plan_from_fingerprint

    cases = [c for c in load_datalist(data) if c.site in cfg.data.source_sites]
    rows = fingerprint_cases(cases, workers=workers)
    plan = plan_from_fingerprint(rows, cfg, memory_gb=memory_gb or DEFAULT_MEMORY_GB)
    plan.apply(cfg)
    print("[plan] --plan auto " + "\n".join(plan.reasons))
    if out is not None:
        write_fingerprint(out, rows, summarise_sites(rows), figure=False)
        (Path(out) / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    return plan


def _load_config(args: argparse.Namespace):
    from dualssl.config import Config

    cfg = Config.load(args.config) if args.config else Config()
    cfg.with_overrides(args.set or [])
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from dualssl.engine import fit
    from dualssl.engine.callbacks import CheckpointSaver, ConsoleLogger, RunSummary

    cfg = _load_config(args)
    cfg.data.root = str(args.data)
    if args.source:
        cfg.data.source_sites = [s for s in args.source.split(",") if s]
    cfg.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plan == "auto":
        plan_config(cfg, args.data, args.plan_memory_gb, out, workers=args.plan_workers)
    cfg.save(out / "config.yaml")
    resume = out / "checkpoint_latest.pt" if args.resume else None
    result = fit(cfg, callbacks=[ConsoleLogger(), CheckpointSaver(out), RunSummary(out)], resume_from=resume, out_dir=out)
    print(f"best {cfg.eval.selection_metric} = {result.best_metric:.4f} at epoch {result.best_epoch}; "
          f"checkpoint: {out / 'checkpoint_best.pt'}")
    return 0


def _registry(args: argparse.Namespace) -> None:
    """Point MLflow at ``--tracking-uri`` when ``--model`` is a registry or run URI."""
    if args.model and args.tracking_uri and str(args.model).startswith(("models:/", "runs:/")):
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)  # the model registry follows the tracking store


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dualssl.evaluation.run import evaluate_checkpoint, evaluate_model

    sites = [s for s in args.sites.split(",") if s] if args.sites else None
    if args.model:
        _registry(args)
        summary = evaluate_model(args.model, data_root=args.data, sites=sites, out_dir=args.out, tta=args.tta)
    else:
        summary = evaluate_checkpoint(args.checkpoint, data_root=args.data, sites=sites, out_dir=args.out,
                                      tta=args.tta)
    for site, stats in summary["per_site"].items():
        print(f"{site:>16s}  dice {stats['dice_mean']:.4f} +- {stats['dice_std']:.4f}  "
              f"hd95 {stats['hd95_mean']:.2f} mm (found cases; missed {stats['n_missed']}, penalised "
              f"{stats['hd95_penalised_mean']:.2f} mm)  (n={stats['n']})")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from dualssl.evaluation.run import predict_paths

    _registry(args)
    written = predict_paths(args.model or args.checkpoint, args.inputs, args.output, tta=args.tta)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualssl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantom", help="write a procedural multi-site abdominal CT phantom (MSD layout)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    p.add_argument("--sites", default="", help="comma-separated site profiles (default: all)")
    p.add_argument("--cases-per-site", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=0.5,
                   help="resolution scale: 1.0 = clinical size, 0.5 (default) = demo size")
    p.add_argument("--workers", type=int, default=1, help="processes used to render cases")
    p.add_argument("--sweep", action="append", metavar="AXIS=V1,V2,...",
                   help="severity sweep: one site per value of AXIS (noise, hu_offset, hu_scale, slice, phase, "
                        "cupping, truncation, pixel; units in docs/PHANTOM.md), plus the base site; repeatable")
    p.add_argument("--sweep-base", default="pv_standard", help="site the sweeps derive from (default pv_standard)")
    p.add_argument("--shape-bank", type=Path, default=None, metavar="DIR",
                   help="folder of real pancreas masks (e.g. the MSD Task07 labels): each case's pancreas is one "
                        "of them, deformed and placed in the anatomy (default: the procedural pancreas)")
    add_phantom_option_flags(p)
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("verify-dataset", help="report every problem of a dataset at once")
    p.add_argument("root", type=Path, help="dataset root or CSV/JSON list")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("fingerprint", help="per-site spacing, shape, orientation, intensity and label statistics")
    p.add_argument("data", type=Path, help="dataset root or CSV/JSON list")
    p.add_argument("--source", default="", help="source site: say how every other site differs from it")
    p.add_argument("--out", type=Path, default=None, help="folder for fingerprint.json, .csv and .png")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="processes reading cases (one case each at a time)")
    p.set_defaults(func=_cmd_fingerprint)

    p = sub.add_parser("train", help="train on source site(s) without Ray")
    p.add_argument("--data", required=True, type=Path, help="dataset root or CSV/JSON list")
    p.add_argument("--source", default="", help="comma-separated source site(s)")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, summary.json, plot)")
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. loss.tau=0.1")
    p.add_argument("--resume", action="store_true", help="resume from OUT/checkpoint_latest.pt")
    add_plan_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="per-case and per-site metrics of a checkpoint or an exported model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a training checkpoint (.pt)")
    src.add_argument("--model", help="an exported model folder or models:/NAME@ALIAS (the study's export)")
    p.add_argument("--data", required=True, type=Path, help="dataset root, split as the model was trained")
    p.add_argument("--sites", default="", help="comma-separated sites (default: every non-source site; a source "
                                               "site gives its validation cases)")
    p.add_argument("--out", required=True, type=Path, help="folder for per_case.csv and summary.json")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (default: the model's eval.tta_flips, as the study evaluated)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow store of a models:/ or runs:/ URI (default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="segment NIfTI scans (a file or a folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a training checkpoint (.pt)")
    src.add_argument("--model", help="an exported model folder or models:/NAME@ALIAS")
    p.add_argument("inputs", nargs="+", type=Path, help="NIfTI files or folders of them")
    p.add_argument("-o", "--output", required=True, type=Path, help="output file (one input) or folder")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (default: the model's eval.tta_flips, as the study and the "
                        "served model run it)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow store of a models:/ or runs:/ URI, e.g. sqlite:////abs/study/mlflow.db "
                        "(default: MLFLOW_TRACKING_URI)")
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dualssl.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"dualssl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
