"""The domain-shift study: arms x seeds x source sites, every cell scored on every unseen site.

Each cell trains one arm (``dualssl.recipes.ARMS``: plain, contrastive, restoration, dual, and the
DG baselines bigaug, randconv, gin; or your own from ``--arms-file``) with one seed on one source
site, all under one protocol (the same net, schedule, patches and source-validation selection), as
a Ray Train DDP run driven by the trainable that ``tune.py`` uses; the cells are a Tune
``grid_search``. The best epoch of every cell is measured on the source validation cases and on
every other site, severity-sweep sites included, and the study ends with statistics (crossed
patients x seeds CIs, paired differences against ``--reference``, default ``plain``) and a report::

    python studies/domain_shift.py                      # 2 arms x 3 seeds on the phantom, ~30 min on 2 cores
    python studies/domain_shift.py --smoke-test         # 2 arms x 2 seeds, tiny net, a few minutes
    python studies/domain_shift.py --arms plain,dual,bigaug,gin --leave-one-site-out --seeds 5 \\
        --data /data/multisite --storage-path /mnt/shared/studies --mlflow-tracking-uri http://mlflow:5000
    ray job submit --working-dir . -- python studies/domain_shift.py --smoke-test
    python studies/domain_shift.py --arms plain,dual,nnunet,nnunet-da5 --budgets 100,300,1000 --reference nnunet

The last one (36 cells) takes many hours on 2 CPU cores: ``--budgets`` runs every arm at each training
budget (iterations) as its own arm ``ARM@B``, compared with the ``--reference`` arm at the same budget:
one report per budget and the budget axis in the top-level report (``studies/shift_budgets.py``,
``dualssl/report/budgets.py``). Every report states each arm's budget and wall time (``cells.csv``).

Steps: 1. preflight on the driver (flags, arms, config, data: every problem at once, exit 2);
2. data (a phantom with a severity sweep when ``--data`` is absent); 3. Ray and resources; 4. MLflow
parent run; 5. the grid (``--resume`` reruns no finished cell); 6. per-case table of every cell;
7. statistics and report, logged to the parent run. A cell that fails is named in the report and on
the parent run; the statistics use the cells that finished (pairs only where both arms finished) and
the study exits 1. The terminal shows a progress table, one line per ended cell and the headline
(``studies/shift_console.py``); Ray's boxes and worker lines only with ``--verbose``.

Reported numbers use every case of the unseen sites: the cells are selected on source validation
only, so the unseen sites' oracle selection part (``studies/crosssite.py``) was never looked at; the
``part`` column of ``cases.csv`` keeps it apart for anyone who wants the report part alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python studies/domain_shift.py`: make `studies` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config, ConfigError  # noqa: E402
from dualssl.recipes import ARMS, PEER_ARMS, apply_recipe  # noqa: E402
from studies.preflight import claim_storage, storage_owner_problem  # noqa: E402
from studies.resources import ResourceError, StudyResources, check_resources  # noqa: E402
from studies.shift_arms import arm_table, best_loss_weights, describe_arms  # noqa: E402,F401
from studies.shift_budgets import (add_budget_flags, arm_param, budget_problems,  # noqa: E402
                                   describe_budget_arms, expand_arms, parse_budgets, reference_arm)
from studies.shift_data import (DEFAULT_SWEEP, PHANTOM_SITES, SMOKE_SITES, dataset_sites,  # noqa: E402,F401
                                ensure_data, sweep_spec)

DEFAULT_STORAGE = Path.home() / "dualssl-studies"

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studies/domain_shift.py", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="dataset root or list (default: a phantom in the study folder)")
    p.add_argument("--source-sites", default=None,
                   help="training site(s), one cell each, comma-separated (default pv_standard)")
    p.add_argument("--leave-one-site-out", action="store_true",
                   help="one cell per (non-sweep) site as source: the full train x test matrix")
    p.add_argument("--arms", default="plain,dual", help=f"comma-separated; known: {', '.join([*ARMS, *PEER_ARMS])}")
    p.add_argument("--arms-file", type=Path, help="YAML {arm: {dotted.key: value}} adding or redefining arms")
    p.add_argument("--seeds", default=None, help="a count (default 3; smoke 2) or a comma list of seeds")
    p.add_argument("--from-study", type=Path,
                   help="folder of a finished tune.py study selected on source validation (an oracle-selected "
                        "one is refused): the dual arm takes its best trial's loss weights")
    p.add_argument("--sweep", action="append", default=None, metavar="AXIS=V1,V2",
                   help="severity sweep sites of the generated phantom (default noise=25,50; 'none' for none)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per cell (default: the recipe's)")
    add_budget_flags(p)  # --budgets B1,B2 (each arm at each budget, as ARM@B) and --reference ARM
    p.add_argument("--config", type=Path, help="base YAML config (default: the demo / smoke recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every cell")
    p.add_argument("--max-concurrent-trials", type=int, default=1)
    p.add_argument("--workers-per-trial", type=int, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per cell")
    p.add_argument("--storage-path", default=str(DEFAULT_STORAGE))
    p.add_argument("--study-dir", type=Path, default=None)
    p.add_argument("--experiment-name", default=None, help="default dualssl-domain-shift (smoke: -smoke)")
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: sqlite file in the study folder")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a private head)")
    p.add_argument("--resume", action="store_true", help="resume the study: finished cells are not rerun")
    p.add_argument("--smoke-test", action="store_true", help="2 arms x 2 seeds, tiny net and data")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap replicates of the report")
    p.add_argument("--skip-resource-check", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also print Ray's per-worker output")
    from dualssl.cli import add_plan_flags

    add_plan_flags(p)  # --plan auto: spacing, HU window, patch from the (first) source site's fingerprint
    return p


@dataclass
class Plan:
    """What the preflight checked: paths, the base config, the arms and the grid of cells."""

    storage: str
    study_dir: Path
    experiment: str
    cfg: Config
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    source_sites: list[str]
    sweeps: dict[str, list[Any]]
    cells: list[dict[str, Any]] = field(default_factory=list)
    arm_sources: dict[str, str] = field(default_factory=dict)
    """Where each arm's settings came from (default recipe, --arms-file, --from-study)."""
    arm_rows: list[dict[str, str]] = field(default_factory=list)
    """``studies.shift_arms.describe_arms``: each arm's source and resolved differences from the reference."""
    budgets: list[int] = field(default_factory=list)
    """``--budgets`` (iterations); empty: none, and ``arms`` keep their names (else ``ARM@B``)."""
    reference: str = "plain"
    """``--reference``: the arm the paired differences are taken to (with budgets, at the same budget)."""


def parse_seeds(text: str | None, smoke: bool) -> list[int]:
    if text is None:
        return list(range(2 if smoke else 3))
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise ConfigError(f"--seeds {text}: give a count (e.g. 3) or a comma list of integer seeds") from None
    if len(values) == 1:
        if values[0] < 1:
            raise ConfigError(f"--seeds {text}: a count must be >= 1")
        return list(range(values[0]))
    if len(set(values)) != len(values):
        raise ConfigError(f"--seeds {text}: a seed is named twice")
    return values


STUDY_DEFAULTS = {"eval.val_every": 2, "optim.steps_per_epoch": 10}
"""On top of the demo recipe: 100 steps a cell and whole-volume validation every other epoch (the best
epoch is chosen among those, the same for every arm), which keeps the default study of 6 cells within
30 minutes on 2 cores (the figures in README.md were measured so)."""


def base_config(args: argparse.Namespace) -> Config:
    if args.config:
        cfg = Config.load(args.config)
    elif args.smoke_test:
        cfg = apply_recipe(Config(), "smoke")
    else:
        cfg = apply_recipe(Config(), "demo").with_overrides(dict(STUDY_DEFAULTS))
    if args.epochs is not None:
        cfg.optim.epochs = args.epochs
    cfg.with_overrides(args.set)
    return cfg.validate()


def make_cells(arms: dict[str, dict[str, Any]], seeds: list[int], sources: list[str]) -> list[dict[str, Any]]:
    """One ``study.overrides`` dict per (source site, arm, seed), labelled for MLflow."""
    cells = []
    for source in sources:
        for arm, overrides in arms.items():
            for seed in seeds:
                label = f"{arm}-s{seed}-{source}"
                cells.append({**overrides, "optim.seed": seed, "data.source_sites": [source],
                              "study.arm": arm, "study.cell": label})
    return cells


def prepare(args: argparse.Namespace) -> Plan:
    """Flags, arms, config and (for ``--data``) every file of the dataset; starts and writes nothing."""
    from studies.tune import StudyError

    problems: list[str] = []
    experiment = args.experiment_name or ("dualssl-domain-shift-smoke" if args.smoke_test else "dualssl-domain-shift")
    storage = os.path.expanduser(args.storage_path)
    if "://" not in storage and not os.path.isabs(storage):
        problems.append(f"--storage-path {args.storage_path}: give an absolute path (a Ray job runs in a copy "
                        f"of the working dir), e.g. {DEFAULT_STORAGE}")
    study_dir = Path(args.study_dir or (Path(storage) / experiment if "://" not in storage
                                        else DEFAULT_STORAGE / experiment)).expanduser().resolve()
    if owned := storage_owner_problem(storage, experiment, study_dir):
        problems.append(owned)
    cfg = arms = seeds = sweeps = None
    sources_of_arms: dict[str, str] = {}
    for step in ("cfg", "arms", "seeds", "sweeps"):
        try:
            if step == "cfg":
                cfg = base_config(args)
            elif step == "arms":
                arms, sources_of_arms = arm_table(args)
            elif step == "seeds":
                seeds = parse_seeds(args.seeds, args.smoke_test)
            else:
                sweeps = sweep_spec(args)
        except ConfigError as exc:
            problems.append(str(exc))
    if args.data is not None and args.sweep is not None:
        problems.append("--sweep generates phantom sites; with --data, put sweep sites in the dataset itself "
                        "(dualssl phantom --sweep AXIS=V1,V2)")
    sources: list[str] = []
    if args.data is None:
        known = SMOKE_SITES if args.smoke_test else PHANTOM_SITES
        sweep_names: list[str] = []
    else:
        root = args.data.expanduser().resolve()
        if not root.exists():
            problems.append(f"--data {root}: not found; give a dataset root or list, or leave it out for a phantom")
            known, sweep_names = [], []
        else:
            try:
                all_sites, records = dataset_sites(root)
            except (ValueError, OSError) as exc:
                problems.append(f"--data {root}: {exc}")
                all_sites, records = [], {}
            sweep_names = sorted(records)
            known = [s for s in all_sites if s not in records]
    if args.leave_one_site_out:
        if args.source_sites:
            problems.append("--leave-one-site-out and --source-sites both choose the source sites; give one")
        sources = list(known)
    else:
        sources = [s.strip() for s in (args.source_sites or "pv_standard").split(",") if s.strip()]
        unknown = [s for s in sources if s not in known]
        if unknown and known:
            problems.append(f"--source-sites {','.join(unknown)}: not a site of the dataset; its sites: "
                            f"{', '.join(known)}" + (f" (sweep sites {', '.join(sweep_names)} are test-only)"
                                                     if sweep_names else ""))
    if len(known) < 2 and not problems:
        problems.append("the dataset has one site: a domain-shift study needs at least one unseen site")
    if args.data is not None and not problems and cfg is not None:
        from dualssl.data.verify import verify_dataset

        for source in sources:
            found = verify_dataset(args.data.expanduser().resolve(), [source], val_fraction=cfg.data.val_fraction,
                                   split_seed=cfg.data.split_seed, workers=min(8, os.cpu_count() or 1))
            problems.extend(str(p) for p in found if p.fatal and str(p) not in problems)
    problems.extend(budget_problems(args, cfg, list(arms or {})))
    if problems:
        raise StudyError(problems)
    if cfg.data.cache_dir and not os.path.isabs(os.path.expanduser(cfg.data.cache_dir)):
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    budgets = parse_budgets(args.budgets)
    arms, sources_of_arms = expand_arms(arms, sources_of_arms, budgets, cfg.optim.steps_per_epoch)
    plan = Plan(storage, study_dir, experiment, cfg, arms, seeds, sources, sweeps, budgets=budgets,
                reference=reference_arm(args))
    plan.cells = make_cells(arms, seeds, sources)
    plan.arm_sources = sources_of_arms
    try:
        plan.arm_rows = describe_budget_arms(cfg, arms, sources_of_arms, budgets, plan.reference)
    except ConfigError as exc:
        raise StudyError([f"--arms: {exc}"]) from exc
    return plan


def run_study(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    import ray
    from ray import tune

    from studies import trainable as trainable_mod
    from studies.shift_table import CASE_COLUMNS, collect, write_csv
    from studies.pending_writes import JOURNAL_NAME
    from studies.tracking import TrialRuns, default_tracking, git_revision, result_loggers, start_parent_run
    from studies.tune import cluster_nodes, connect, default_workers

    started = time.time()
    plan.study_dir.mkdir(parents=True, exist_ok=True)
    claim_storage(plan.storage, plan.experiment, plan.study_dir)
    cfg = plan.cfg
    # 2. Data: the given dataset or a phantom (with its severity sweep) made once in the study folder.
    cfg.data.root = str(ensure_data(args, plan))
    _, sweeps = dataset_sites(Path(cfg.data.root))
    tracking_uri = default_tracking(plan.study_dir, args.mlflow_tracking_uri)

    # 3. Ray and resources.
    connect(args.address, log_to_driver=args.verbose)
    resources = StudyResources(args.max_concurrent_trials, default_workers(args, ray.cluster_resources().get("CPU", 0)),
                               args.cpus_per_worker, args.gpus_per_worker)
    if not args.skip_resource_check:
        check_resources(resources, ray.cluster_resources(), cluster_nodes())
    # 3b. Before any cell: fingerprint, --plan auto, every cell's cases preprocessed once (studies/preprocess.py).
    from studies.preprocess import cell_configs, log_to_parent, prepare_data

    data_pass = prepare_data(cfg, plan.study_dir, plan=args.plan, memory_gb=args.plan_memory_gb,
                             cell_configs=cell_configs(cfg, plan.cells), source_sets=[[s] for s in plan.source_sites])
    for cell in plan.cells:  # --plan auto: every cell with the plan of its own source site
        cell.update(data_pass.cell_overrides(cell["data.source_sites"]))
    settings = trainable_mod.TrialSettings(
        workers=resources.workers_per_trial, cpus_per_worker=resources.cpus_per_worker,
        gpus_per_worker=resources.gpus_per_worker, train_storage=f"{plan.storage}/{plan.experiment}/train_runs",
        selection="source-val", max_failures=args.max_failures)
    length = (f"budgets {', '.join(map(str, plan.budgets))} iterations" if plan.budgets
              else f"{cfg.optim.epochs} epochs")
    print(f"[domain-shift] {plan.experiment}: {len(plan.cells)} cells = {len(plan.arms)} arms "
          f"({', '.join(plan.arms)}) x {len(plan.seeds)} seeds x {len(plan.source_sites)} source site(s); "
          f"{length}; {resources.max_concurrent_trials} at a time", flush=True)

    # 4. MLflow parent run (reopened on --resume).
    manifest_path = plan.study_dir / "study.json"
    previous = json.loads(manifest_path.read_text()) if args.resume and manifest_path.is_file() else {}
    tags = {"study": plan.experiment, "role": "domain-shift study", "selection": "source-val",
            "git_revision": git_revision(), "arms": ",".join(plan.arms), "seeds": ",".join(map(str, plan.seeds)),
            "source_sites": ",".join(plan.source_sites), "reference": plan.reference,
            "budgets": ",".join(map(str, plan.budgets)) or "none"}
    parent = start_parent_run(tracking_uri, plan.experiment, f"domain-shift-{plan.experiment}", tags,
                              {"cells": len(plan.cells), **{arm_param(a): json.dumps(v) for a, v in plan.arms.items()},
                               **asdict(resources)}, run_id=previous.get("parent_run_id"))
    manifest = {"experiment": plan.experiment, "storage": plan.storage, "study_dir": str(plan.study_dir),
                "tracking_uri": tracking_uri, "parent_run_id": parent, "arms": plan.arms, "seeds": plan.seeds,
                "source_sites": plan.source_sites, "data_root": cfg.data.root, "sweeps": sweeps,
                "resources": asdict(resources), "kind": "domain-shift", "arms_provenance": plan.arm_rows,
                "budgets": plan.budgets, "reference": plan.reference}
    manifest.update(plan=data_pass.plan, cache_dirs=data_pass.cache_dirs)
    log_to_parent(tracking_uri, parent, data_pass)
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))

    # 5. The grid: one Tune trial per cell, no early stopping (every arm gets the same schedule).
    # Without --verbose: our table and one line per ended cell (studies/shift_console.py), not Ray's boxes.
    from studies.shift_console import CellReporter, quiet_tune_errors

    if not args.verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's progress_reporter is used only by the classic output
    quiet_tune_errors(args.verbose)
    trainable = tune.with_resources(trainable_mod.train_func, resources.trial_resources())
    tuner_path = f"{plan.storage}/{plan.experiment}"
    if args.resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(tuner_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        space = trainable_mod.study_config(cfg, settings, {})
        space["study.overrides"] = tune.grid_search(plan.cells)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=resources.max_concurrent_trials,
                                        trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                        trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name=plan.experiment, storage_path=plan.storage,
                                      verbose=2 if args.verbose else 1, failure_config=tune.FailureConfig(max_failures=1),
                                      progress_reporter=None if args.verbose else CellReporter(len(plan.cells)),
                                      callbacks=[TrialRuns(tracking_uri, parent, tags,
                                                           journal=plan.study_dir / JOURNAL_NAME),
                                                 *result_loggers()]))
    grid = tuner.fit()

    # 6. One table of every case of every finished cell.
    cases, cells = collect(grid, plan.study_dir, sweeps)
    cases_csv = write_csv(cases, plan.study_dir / "cases.csv", CASE_COLUMNS)
    write_csv(cells, plan.study_dir / "cells.csv")
    done = [c for c in cells if c["status"] == "completed"]
    failed = [c for c in cells if c["status"] != "completed"]

    # 7. Statistics and the report (on the unseen sites' every case; see the module docstring), with
    # each arm's budget and wall time; with --budgets one report per budget (studies/shift_report.py).
    from studies.shift_report import log_parent, write_study_report

    summary: dict[str, Any] = {"study_dir": str(plan.study_dir), "tracking_uri": tracking_uri, "cells": cells}
    written = write_study_report(plan, cases_csv, cases, cells, n_boot=args.n_boot, phantom=args.data is None,
                                 data_root=cfg.data.root, data_pass=data_pass, started=started)
    summary.update({k: v for k, v in written.items() if k != "paths"})
    log_parent(tracking_uri, parent, plan.study_dir, written["paths"], failed, len(cells))
    summary["wall_time_s"] = time.time() - started
    manifest.update(wall_time_s=summary["wall_time_s"], cells_done=len(done),
                    cells_failed=[{k: c.get(k) for k in ("cell", "status", "error")} for c in failed])
    manifest_path.write_text(json.dumps(manifest, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from studies.local_cluster import needs_private_head, reserve_auth, study_cluster
    from studies.preflight import console_defaults

    if needs_private_head(args.address):
        reserve_auth()  # before anything imports ray: it reads the auth mode once
    console_defaults(args.verbose)
    try:
        plan = prepare(args)
        with study_cluster(args.address) as address:
            args.address = address
            summary = run_study(args, plan)
    except (ConfigError, ResourceError) as exc:
        print(f"studies/domain_shift.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    report = summary.get("report", {})
    for line in summary.get("headline", []):
        print(line)
    done = sum(c["status"] == "completed" for c in summary["cells"])
    failed = [c["cell"] for c in summary["cells"] if c["status"] != "completed"]
    print(f"\n{done} of {len(summary['cells'])} cells finished" + (f"; did not finish: {', '.join(failed)}"
                                                                      if failed else "") + ".")
    print(f"Report:       {report.get('html', '(none: no cell finished)')}")
    if "markdown" in report:
        print(f"              {report['markdown']}")
    for budget, html in summary.get("budget_reports", {}).items():
        print(f"  budget {budget}: {html}")
    print(f"MLflow UI:    mlflow ui --backend-store-uri {summary['tracking_uri']}")
    print(f"Study folder: {summary['study_dir']}  (wall time {summary['wall_time_s']:.0f} s)")
    return 0 if done == len(summary["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
