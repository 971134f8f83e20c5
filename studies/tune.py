"""Hyperparameter study of dualssl on Ray Tune: OptunaSearch (TPE) + ASHA + MLflow, then export.

Run it with no flags for a complete small study on this machine (phantom data, 2-worker DDP per
trial where the CPUs allow); ``--smoke-test`` for a one-minute version; on a cluster, submit it as a
Ray job (cluster/README.md)::

    python studies/tune.py
    python studies/tune.py --smoke-test
    python studies/tune.py --data /data/Task07 --source-site msd --num-samples 32 \\
        --max-concurrent-trials 4 --workers-per-trial 2 --gpus-per-worker 1 \\
        --storage-path /mnt/shared/studies --mlflow-tracking-uri http://mlflow:5000

Steps: 1. preflight on the driver (:func:`prepare`): flags, config, search space and every file
of the dataset, all problems in one message and exit status 2 before anything starts; 2. data
(phantom when absent); 3. connect to Ray and check resources; 4. MLflow parent run; 5. Tuner.fit;
6. cross-site numbers of trials stopped early; 7. best trial, summary and export.

What the user says is what runs: config file (or the demo/smoke recipe without one), then the
flags that were given (``--epochs``, ``--source-site``), then ``--set``. A flag and a ``--set`` of
the same field is an error; a ``--set`` of a searched parameter takes it out of the search (printed),
so ``--set loss.lambda_con=0`` trains every trial with exactly 0.

Selection (``--selection``): ``source-val`` ranks trials on the best source-validation
``eval.selection_metric``; ASHA cuts on that same metric, only at epochs where it was measured
(milestones are multiples of ``eval.val_every``). ``oracle`` ranks on ``oracle/mean_unseen_dice``
(the selection part of the unseen sites; reported numbers come from their report part) and runs
without ASHA, since that metric exists only at a trial's end. Both log the oracle numbers under
``oracle/``; the tags ``selection`` and ``selection_metric`` say which ranked the trials.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python studies/tune.py`: make `studies` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config, ConfigError  # noqa: E402
from dualssl.recipes import apply_recipe  # noqa: E402
from studies.resources import ResourceError, StudyResources, check_resources  # noqa: E402
from studies.search_space import DEFAULT_SEARCH_SPACE, load_search_space, make_searcher  # noqa: E402

DEFAULT_STORAGE = Path.home() / "dualssl-studies"
PHANTOM_SITES = ["pv_standard", "native_thick", "lowdose_sharp", "cone_beam"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studies/tune.py", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="dataset root or list (default: a phantom in the study folder)")
    p.add_argument("--source-site", default=None,
                   help="training site(s), comma-separated (default: the config's data.source_sites, pv_standard)")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default 4; smoke 2)")
    p.add_argument("--max-concurrent-trials", type=int, default=1)
    p.add_argument("--workers-per-trial", type=int, default=None,
                   help="DDP workers per trial (default: 2 where the CPUs allow, else 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 10; smoke 2)")
    p.add_argument("--storage-path", default=str(DEFAULT_STORAGE),
                   help="absolute path, NFS mount or s3:// URI shared by all nodes")
    p.add_argument("--study-dir", type=Path, default=None,
                   help="local folder for the phantom, MLflow sqlite, trial table and model "
                        "(default: STORAGE/EXPERIMENT when storage is local)")
    p.add_argument("--experiment-name", default=None, help="default dualssl-study (smoke: dualssl-smoke)")
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: sqlite file in the study folder")
    p.add_argument("--selection", choices=["source-val", "oracle"], default="source-val",
                   help="rank trials by source-validation Dice, or by unseen-site Dice (labelled oracle)")
    p.add_argument("--search-space", type=Path, default=DEFAULT_SEARCH_SPACE)
    p.add_argument("--config", type=Path, help="base YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: epochs before the first cut, rounded up to a multiple of eval.val_every "
                        "(default: a third of the epochs)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (default: RAY_ADDRESS as set by "
                        "`ray job submit`, else a private head started for this study and stopped after it)")
    p.add_argument("--resume", action="store_true", help="resume the study in STORAGE/EXPERIMENT")
    p.add_argument("--smoke-test", action="store_true", help="tiny data, net and epochs")
    p.add_argument("--no-export", action="store_true", help="skip the export of the best model")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="for autoscaling clusters whose nodes are not up yet")
    p.add_argument("--fail-at-epoch", type=int, default=-1, help=argparse.SUPPRESS)  # tests: fault injection
    return p


class StudyError(ConfigError):
    """Every problem the preflight found, one per line, each naming its flag, field or file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s); nothing was started:\n  " + "\n  ".join(problems))


def set_keys(overrides: list[str]) -> dict[str, str]:
    """``--set`` items -> ``{dotted key: value text}`` (a malformed item raises ConfigError)."""
    out: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set loss.tau=0.1")
        out[key.strip()] = value.strip()
    return out


def base_config(args: argparse.Namespace) -> Config:
    """Config file or recipe, then the flags that were given, then ``--set`` (validated)."""
    cfg = Config.load(args.config) if args.config else Config()
    if args.config is None:  # pass --config for the full-size network (cluster/full-size.yaml)
        apply_recipe(cfg, "smoke" if args.smoke_test else "demo")
    given = set_keys(args.set)
    flags = {"optim.epochs": ("--epochs", args.epochs), "data.source_sites": ("--source-site", args.source_site)}
    for key, (flag, value) in flags.items():
        if value is not None and key in given:
            raise ConfigError(f"{flag} {value} and --set {key}={given[key]} both set {key}; give one of them")
    if args.epochs is not None:
        cfg.optim.epochs = args.epochs
    if args.source_site is not None:
        cfg.data.source_sites = [s.strip() for s in args.source_site.split(",") if s.strip()]
    cfg.with_overrides(given)
    return cfg.validate()


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(args: argparse.Namespace) -> tuple[str, Path, str]:
    """(storage, study_dir, experiment) with storage absolute (a Ray job runs in a copy); writes nothing."""
    experiment = args.experiment_name or ("dualssl-smoke" if args.smoke_test else "dualssl-study")
    storage = args.storage_path
    if not is_uri(storage):
        if not os.path.isabs(os.path.expanduser(storage)):
            raise ConfigError(f"--storage-path {storage}: give an absolute path (a Ray job runs in a copy of "
                              f"the working dir, so a relative path would point elsewhere), e.g. {DEFAULT_STORAGE}")
        storage = os.path.expanduser(storage)
    study_dir = args.study_dir or (Path(storage) / experiment if not is_uri(storage)
                                   else DEFAULT_STORAGE / experiment)
    return storage, Path(study_dir).expanduser().resolve(), experiment


def phantom_sites(args: argparse.Namespace) -> list[str]:
    return PHANTOM_SITES[:3] if args.smoke_test else PHANTOM_SITES


def ensure_data(args: argparse.Namespace, study_dir: Path) -> Path:
    """The dataset root: ``--data`` (checked by :func:`prepare`), else a phantom made once in the study folder."""
    if args.data is not None:
        return args.data.expanduser().resolve()
    from dualssl.data.phantom import generate_dataset

    root = study_dir / "phantom"
    if not (root / "dataset.json").is_file():
        print(f"[study] generating the phantom dataset in {root}", flush=True)
        generate_dataset(root, sites=phantom_sites(args), cases_per_site=4 if args.smoke_test else 5,
                         seed=0, scale=0.3)
    return root


@dataclass
class StudyPlan:
    """What :func:`prepare` checked: paths, the config every trial starts from and the search."""

    storage: str
    study_dir: Path
    experiment: str
    cfg: Config
    search: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    """Printed before the study starts: fixed search parameters, resolved paths, data warnings."""


def _data_problems(args: argparse.Namespace, cfg: Config, notes: list[str]) -> list[str]:
    from dualssl.data.verify import verify_dataset

    sites = cfg.data.source_sites
    if args.data is None:
        known = phantom_sites(args)
        unknown = [s for s in sites if s not in known]
        return [f"--source-site {','.join(unknown)}: not a site of the phantom; its sites: {', '.join(known)}"
                ] if unknown else []
    root = args.data.expanduser().resolve()
    if not root.exists():
        return [f"--data {root}: not found; give a dataset root or list, or leave it out for a phantom"]
    found = verify_dataset(root, sites, val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed,
                           workers=min(8, os.cpu_count() or 1))
    notes.extend(f"data: {p}" for p in found if not p.fatal)
    out = []
    for p in found:
        if p.fatal:
            flag = "--source-site: " if "source site" in p.message else ""
            out.append(f"{flag}{p}")
    return out


def prepare(args: argparse.Namespace) -> StudyPlan:
    """Check flags, config, search space and data on the driver; raises :class:`StudyError`
    naming every problem. Starts nothing and writes nothing."""
    problems: list[str] = []
    notes: list[str] = []
    storage = study_dir = experiment = cfg = search = None
    try:
        storage, study_dir, experiment = resolve_paths(args)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        cfg = base_config(args)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        search = load_search_space(args.search_space)
    except ConfigError as exc:
        problems.append(str(exc))
    # The data are checked even when the config is wrong: every problem in one message.
    data_cfg = cfg or Config()
    if cfg is None and args.source_site:
        data_cfg.data.source_sites = [s.strip() for s in args.source_site.split(",") if s.strip()]
    problems.extend(_data_problems(args, data_cfg, notes))
    if cfg is not None:
        if cfg.data.cache_dir and not os.path.isabs(os.path.expanduser(cfg.data.cache_dir)):
            cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
            notes.append(f"data.cache_dir is relative: resolved against {Path.cwd()} to {cfg.data.cache_dir}")
        if args.selection == "oracle" and args.data is None and set(cfg.data.source_sites) >= set(phantom_sites(args)):
            problems.append("--selection oracle: every site is a source site, so there is no unseen site to rank on")
    if search is not None and cfg is not None:
        given = set_keys(args.set)
        fixed = sorted(k for k in search if k in given)
        for key in fixed:
            del search[key]
            notes.append(f"--set {key}={given[key]}: fixed for every trial, taken out of the search space "
                         f"{args.search_space}")
        if not search:
            problems.append(f"--set fixes every parameter of the search space {args.search_space} "
                            f"({', '.join(fixed)}); search at least one, or give another --search-space")
    if problems:
        raise StudyError(problems)
    return StudyPlan(storage, study_dir, experiment, cfg, search, notes)


def asha_milestones(epochs: int, val_every: int, grace: int | None) -> int | None:
    """ASHA's grace period rounded up to a multiple of ``val_every`` (every rung g, 2g, 4g ... then
    falls on an epoch with a whole-volume validation); None when no rung lies before the last epoch."""
    grace = grace or max(1, epochs // 3)
    aligned = math.ceil(grace / val_every) * val_every
    return aligned if aligned < epochs else None


def connect(address: str | None) -> None:
    """Join a cluster (RAY_ADDRESS / --address, as inside ``ray job submit``) or start a local one."""
    import ray
    from ray import cloudpickle

    import studies

    # Ship this package by value: workers need not find studies/ on their own sys.path.
    cloudpickle.register_pickle_by_value(studies)
    if not ray.is_initialized():
        # main() starts a private head (studies/local_cluster.py) when neither --address nor
        # RAY_ADDRESS (set by `ray job submit`) names a cluster; run_study() alone may start a
        # plain local one.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def default_workers(args: argparse.Namespace, cluster_cpus: float) -> int:
    if args.workers_per_trial is not None:
        return args.workers_per_trial
    per_trial = cluster_cpus / max(1, args.max_concurrent_trials)
    return 2 if per_trial >= 2 * args.cpus_per_worker else 1


def _measured_asha():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class MeasuredASHA(ASHAScheduler):
        """ASHA that ignores results whose metric is NaN (epochs without validation): Ray's ASHA
        would record the NaN at the rung, so the trial would never be compared there."""

        def _measured(self, result: dict) -> bool:
            value = result.get(self._metric)
            return isinstance(value, (int, float)) and math.isfinite(value)

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if not self._measured(result):
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            if self._measured(result):
                super().on_trial_complete(tune_controller, trial, result)
            else:
                self._trial_info.pop(trial.trial_id, None)

    return MeasuredASHA


def make_scheduler(cfg: Config, args: argparse.Namespace):
    """ASHA on the selection metric at validated epochs (source-val); none for oracle selection."""
    from ray.tune.schedulers import FIFOScheduler

    from studies.train_loop import ASHA_KEY

    grace = asha_milestones(cfg.optim.epochs, cfg.eval.val_every, args.grace_period)
    if args.selection == "oracle" or grace is None:
        why = ("the oracle metric exists only at a trial's end" if args.selection == "oracle"
               else f"no validated epoch before the last (epochs {cfg.optim.epochs}, eval.val_every "
                    f"{cfg.eval.val_every})")
        print(f"[study] early stopping off: {why}", flush=True)
        return FIFOScheduler()
    if args.grace_period and grace != args.grace_period:
        print(f"[study] --grace-period {args.grace_period} -> {grace}: a multiple of eval.val_every "
              f"{cfg.eval.val_every}, so every ASHA rung falls on a validated epoch", flush=True)
    # ASHA_KEY is the selection metric on validated epochs before the last, NaN elsewhere: ASHA
    # skips the NaNs, so a trial that trained to the end lives on to its cross-site evaluation.
    return _measured_asha()(time_attr="epochs_done", metric=ASHA_KEY, mode="max", max_t=cfg.optim.epochs,
                         grace_period=grace, reduction_factor=2, stop_last_trials=False)


def selection_metric_tag(cfg: Config, selection: str) -> str:
    from studies.trainable import ORACLE_METRIC

    if selection == "oracle":
        return f"{ORACLE_METRIC} (selection part of the unseen sites; reported on their report part)"
    return f"{cfg.eval.selection_metric} (source validation, best epoch)"


def run_study(args: argparse.Namespace, plan: StudyPlan | None = None) -> dict[str, Any]:
    import ray
    from ray import tune

    from studies import trainable as trainable_mod
    from studies.finish import finish_study, write_manifest
    from studies.tracking import TrialRuns, git_revision, start_parent_run

    started = time.time()
    # 1. Flags -> config, paths, search space, data files (errors name the flag or file).
    plan = plan or prepare(args)
    for note in plan.notes:
        print(f"[study] {note}", flush=True)
    storage, study_dir, experiment, cfg, search = plan.storage, plan.study_dir, plan.experiment, plan.cfg, plan.search
    study_dir.mkdir(parents=True, exist_ok=True)
    num_samples = args.num_samples or (2 if args.smoke_test else 4)
    tracking_uri = args.mlflow_tracking_uri or f"sqlite:///{study_dir / 'mlflow.db'}"

    # 2. Data: the given dataset, or a phantom generated once into the study folder.
    cfg.data.root = str(ensure_data(args, study_dir))
    cfg.validate()

    # 3. Ray, and a resource check that says what to change instead of letting trials wait forever.
    connect(args.address)
    cluster = ray.cluster_resources()
    resources = StudyResources(args.max_concurrent_trials, default_workers(args, cluster.get("CPU", 0)),
                               args.cpus_per_worker, args.gpus_per_worker)
    if not args.skip_resource_check:
        check_resources(resources, cluster, cluster_nodes())
    settings = trainable_mod.TrialSettings(
        workers=resources.workers_per_trial, cpus_per_worker=resources.cpus_per_worker,
        gpus_per_worker=resources.gpus_per_worker, train_storage=f"{storage}/{experiment}/train_runs",
        selection=args.selection, max_failures=args.max_failures, fail_at_epoch=args.fail_at_epoch)
    print(f"[study] {experiment}: {num_samples} trials, {resources.max_concurrent_trials} at a time, "
          f"{resources.workers_per_trial} workers x {resources.worker_bundle()} each; "
          f"{cfg.optim.epochs} epochs; storage {storage}", flush=True)

    # 4. MLflow: one parent run per study (reopened on --resume); trial runs nest under it.
    manifest_path = study_dir / "study.json"
    previous = json.loads(manifest_path.read_text()) if args.resume and manifest_path.is_file() else {}
    tags = {"source_site": ",".join(cfg.data.source_sites), "seed": str(cfg.optim.seed),
            "selection": args.selection, "selection_metric": selection_metric_tag(cfg, args.selection),
            "git_revision": git_revision(), "study": experiment}
    if args.selection == "oracle":
        tags["oracle"] = "true: trials ranked on the unseen test sites (not a fair model selection)"
    parent = start_parent_run(tracking_uri, experiment, f"study-{experiment}", {**tags, "role": "study"},
                              {"num_samples": num_samples, **{f"search.{k}": str(v) for k, v in search.items()},
                               **asdict(resources)}, run_id=previous.get("parent_run_id"))
    manifest = {"experiment": experiment, "storage": storage, "study_dir": str(study_dir),
                "tracking_uri": tracking_uri, "parent_run_id": parent, "selection": args.selection,
                "selection_metric": cfg.eval.selection_metric, "source_sites": cfg.data.source_sites,
                "data_root": cfg.data.root, "resources": asdict(resources), "searched": sorted(search)}
    write_manifest(study_dir, manifest)

    # 5. Tune: seeded TPE over the YAML space; ASHA on the selection metric at validated epochs.
    trainable = tune.with_resources(trainable_mod.train_func, resources.trial_resources())
    tuner_path = f"{storage}/{experiment}"
    if args.resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(tuner_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=trainable_mod.study_config(cfg, settings, search),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher("objective", "max", args.seed, n_startup_trials=min(10, num_samples // 2 + 1)),
                scheduler=make_scheduler(cfg, args),
                num_samples=num_samples, max_concurrent_trials=resources.max_concurrent_trials,
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=1),
                callbacks=[TrialRuns(tracking_uri, experiment, parent, tags)],
            ),
        )
    grid = tuner.fit()

    # 6-7. Cross-site numbers for trials ASHA stopped, best trial, parent summary, export.
    summary = finish_study(grid, manifest, export=not args.no_export)
    summary["wall_time_s"] = time.time() - started
    manifest.update({"wall_time_s": summary["wall_time_s"], "best_trial_id": summary.get("best_trial_id")})
    write_manifest(study_dir, manifest)
    return summary


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args)  # every problem at once, before a Ray head, a phantom or MLflow exist
        if args.address is None and not os.environ.get("RAY_ADDRESS"):
            from studies.local_cluster import local_cluster

            with local_cluster() as address:
                args.address = address
                try:
                    summary = run_study(args, plan)
                finally:
                    _disconnect()
        else:
            summary = run_study(args, plan)
    except (ConfigError, ResourceError) as exc:
        print(f"studies/tune.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _disconnect()
    print(summary["report"])
    print(f"\nMLflow UI:    mlflow ui --backend-store-uri {summary['tracking_uri']}")
    if summary.get("model_dir"):
        print(f"Exported model: {summary['model_dir']}  ({summary.get('registered_uri') or 'not registered'})")
        print(f"Segment scans:  dualssl predict --model {summary['model_dir']} SCAN.nii.gz -o OUT")
    print(f"Study folder:   {summary['study_dir']}  (wall time {summary['wall_time_s']:.0f} s)")
    return 0 if summary.get("best_trial_id") else 1


if __name__ == "__main__":
    sys.exit(main())
