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
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python studies/tune.py`: make `studies` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config, ConfigError  # noqa: E402
from studies.preflight import (DEFAULT_STORAGE, PHANTOM_SITES, StudyError, StudyPlan, base_config,  # noqa: E402,F401
                               build_parser, claim_storage, console_defaults, is_uri, phantom_cases_per_site, phantom_sites,
                               prepare, resolve_paths, set_keys, stability_problem)
from studies.resources import ResourceError, StudyResources, check_resources  # noqa: E402
from studies.asha import ASHA_STATE  # noqa: E402,F401
from studies.search_space import finished_trials, make_searcher, optuna_study_for  # noqa: E402

def ensure_data(args: argparse.Namespace, study_dir: Path) -> Path:
    """The dataset root: ``--data`` (checked by :func:`prepare`), else a phantom made once in the study folder."""
    if args.data is not None:
        return args.data.expanduser().resolve()
    from dualssl.data.phantom import generate_dataset

    root = study_dir / "phantom"
    if not (root / "dataset.json").is_file():
        print(f"[study] generating the phantom dataset in {root}", flush=True)
        generate_dataset(root, sites=phantom_sites(args), cases_per_site=phantom_cases_per_site(args),
                         seed=0, scale=0.3, progress=True)
    return root


def asha_milestones(epochs: int, val_every: int, grace: int | None) -> int | None:
    """ASHA's grace period rounded up to a multiple of ``val_every`` (every rung g, 2g, 4g ... then
    falls on an epoch with a whole-volume validation); None when no rung lies before the last epoch."""
    grace = grace or max(1, epochs // 3)
    aligned = math.ceil(grace / val_every) * val_every
    return aligned if aligned < epochs else None


def connect(address: str | None, log_to_driver: bool = True) -> None:
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
        # log_to_driver=False (tune.py without --verbose): the workers' output (Train's "Reporting
        # training result", "Checkpoint successfully created", tqdm bars of the evaluation task) stays
        # in the session's log files (/tmp/ray/session_latest/logs) instead of the terminal.
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=log_to_driver,
                 logging_level="WARNING" if not log_to_driver else "INFO")


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def default_workers(args: argparse.Namespace, cluster_cpus: float) -> int:
    if args.workers_per_trial is not None:
        return args.workers_per_trial
    per_trial = cluster_cpus / max(1, args.max_concurrent_trials)
    return 2 if per_trial >= 2 * args.cpus_per_worker else 1


def make_scheduler(cfg: Config, args: argparse.Namespace, state_path: Path | None = None):
    """ASHA on the selection metric at validated epochs (source-val); none for oracle selection.

    With several ``--objectives`` ASHA cuts on the first one only, and only when it is ``val_dice``
    (the others exist only at a trial's end). ``state_path``: where ASHA keeps its rungs for a resume
    (``STUDY/asha_state.json``); a new scheduler starts from empty rungs, so an earlier file there is removed."""
    from ray.tune.schedulers import FIFOScheduler

    from studies.asha import measured_asha
    from studies.train_loop import ASHA_KEY

    grace = asha_milestones(cfg.optim.epochs, cfg.eval.val_every, args.grace_period)
    first = getattr(args, "objectives", "val_dice").split(",")[0].strip()
    if args.selection == "oracle" or grace is None or first != "val_dice":
        why = ("the oracle metric exists only at a trial's end" if args.selection == "oracle"
               else f"the first objective {first} exists only at a trial's end" if first != "val_dice"
               else f"no validated epoch before the last (epochs {cfg.optim.epochs}, eval.val_every "
                    f"{cfg.eval.val_every})")
        print(f"[study] early stopping off: {why}", flush=True)
        return FIFOScheduler()
    if args.grace_period and grace != args.grace_period:
        print(f"[study] --grace-period {args.grace_period} -> {grace}: a multiple of eval.val_every "
              f"{cfg.eval.val_every}, so every ASHA rung falls on a validated epoch", flush=True)
    # ASHA_KEY is the selection metric on validated epochs before the last, NaN elsewhere: ASHA
    # skips the NaNs, so a trial that trained to the end lives on to its cross-site evaluation.
    scheduler = measured_asha()(time_attr="epochs_done", metric=ASHA_KEY, mode="max", max_t=cfg.optim.epochs,
                                 grace_period=grace, reduction_factor=2, stop_last_trials=False)
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
        scheduler.state_path = str(state_path)
    return scheduler


def registered_model_name(args: argparse.Namespace) -> str:
    """The study's model name in the registry: ``--model-name`` (default ``dualssl-pancreas``), with
    ``-smoke`` appended for ``--smoke-test`` so that a smoke study never adds a version to (or moves
    the aliases of) a user's model; ``export_best.registry_target`` appends ``-oracle`` for oracle studies."""
    from dualssl.export import REGISTERED_MODEL_NAME
    from studies.export_best import SMOKE_SUFFIX

    name = getattr(args, "model_name", None) or REGISTERED_MODEL_NAME
    return f"{name}{SMOKE_SUFFIX}" if args.smoke_test and not name.endswith(SMOKE_SUFFIX) else name


def selection_metric_tag(cfg: Config, selection: str) -> str:
    from studies.trainable import ORACLE_METRIC

    if selection == "oracle":
        return f"{ORACLE_METRIC} (selection part of the unseen sites; reported on their report part)"
    return f"{cfg.eval.selection_metric} (source validation, best epoch)"


REPORT_EVERY_S = 180.0
"""The progress table is printed when the first trial runs, when a trial ends (finished, stopped by
ASHA or errored), at most this often for new epochs, and at the end; not when a trial starts."""


def progress_reporter(search: dict[str, Any]):
    """Tune's ``CLIReporter`` with the searched parameters, epoch, val Dice and the cross-site mean,
    printed when a trial ends and on new epochs at most every :data:`REPORT_EVERY_S` seconds
    (see there); without Ray's memory and resource lines."""
    from ray.tune import CLIReporter

    class StudyReporter(CLIReporter):
        def __init__(self):
            super().__init__(
                parameter_columns={k: k.split(".")[-1] for k in search},
                metric_columns={"epochs_done": "epoch", "val_dice": "val Dice", "objective": "best val Dice",
                                "mean_unseen_dice": "unseen Dice"},
                max_report_frequency=1, print_intermediate_tables=True, max_column_length=14)
            self._seen: tuple = ()
            self._last = 0.0

        def should_report(self, trials, done: bool = False) -> bool:
            ended = tuple(t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR"))
            epochs = tuple((t.last_result or {}).get("epochs_done") for t in trials)
            first = not self._seen and any(t.status == "RUNNING" for t in trials)
            changed = bool(self._seen) and ended != self._seen[0]
            due = bool(self._seen) and epochs != self._seen[1] and time.time() - self._last > REPORT_EVERY_S
            if done or first or changed or due:
                self._seen, self._last = (ended, epochs), time.time()
                return True
            return False

        def report(self, trials, done: bool, *sys_info: str) -> None:
            self._print(self._progress_str(trials, done))  # the table only, not memory and resources

    return StudyReporter()


def run_study(args: argparse.Namespace, plan: StudyPlan | None = None) -> dict[str, Any]:
    import ray
    from ray import tune

    from studies import trainable as trainable_mod
    from studies.finish import finish_study, write_manifest
    from studies.objectives import searcher_metrics
    from studies.pending_writes import JOURNAL_NAME
    from studies.tracking import (TrialRuns, default_tracking, describe_study, git_revision, result_loggers,
                                  start_parent_run)

    started = time.time()
    # 1. Flags -> config, paths, search space, data files (errors name the flag or file).
    plan = plan or prepare(args)
    for note in plan.notes:
        print(f"[study] {note}", flush=True)
    storage, study_dir, experiment, cfg, search = plan.storage, plan.study_dir, plan.experiment, plan.cfg, plan.search
    study_dir.mkdir(parents=True, exist_ok=True)
    claim_storage(storage, experiment, study_dir)
    num_samples = args.num_samples or (2 if args.smoke_test else 4)
    metric, mode = searcher_metrics(plan.objectives)
    optuna_store, optuna_spec, optuna_study = optuna_study_for(
        args.optuna_storage, study_dir, experiment, mode if isinstance(mode, list) else [mode], args.verbose)
    tracking_uri = default_tracking(study_dir, args.mlflow_tracking_uri)

    # 2. Data: the given dataset, or a phantom generated once into the study folder.
    cfg.data.root = str(ensure_data(args, study_dir))
    cfg.validate()
    problem = stability_problem(cfg, plan.objectives)
    if problem:
        raise StudyError([problem])

    # 3. Ray, and a resource check that says what to change instead of letting trials wait forever.
    connect(args.address, log_to_driver=args.verbose)
    # (after connect: Tune's storage helpers must not touch Ray before the driver has the cluster's token)
    tuner_path = f"{storage}/{experiment}"
    restoring = args.resume and tune.Tuner.can_restore(tuner_path)
    earlier = finished_trials(optuna_study)
    continued = earlier > 0 and not restoring
    if continued and num_samples <= earlier:
        raise ConfigError(f"{optuna_spec}: the Optuna study {experiment} already holds {earlier} finished trials; "
                          f"give --num-samples above {earlier} to continue it, --resume to resume an "
                          "interrupted run, or another --experiment-name for a new study")
    cluster = ray.cluster_resources()
    resources = StudyResources(args.max_concurrent_trials, default_workers(args, cluster.get("CPU", 0)),
                               args.cpus_per_worker, args.gpus_per_worker)
    if not args.skip_resource_check:
        check_resources(resources, cluster, cluster_nodes())
    # 3b. Before any trial: every case fingerprinted once, --plan auto, every trial's case preprocessed
    # once into the shared cache by Ray tasks (studies/preprocess.py); a bad scan stops the study here.
    from studies.preprocess import log_to_parent, prepare_data

    data_pass = prepare_data(cfg, study_dir, plan=args.plan, memory_gb=args.plan_memory_gb)
    settings = trainable_mod.TrialSettings(
        workers=resources.workers_per_trial, cpus_per_worker=resources.cpus_per_worker,
        gpus_per_worker=resources.gpus_per_worker, train_storage=f"{storage}/{experiment}/train_runs",
        selection=args.selection, max_failures=args.max_failures, fail_at_epoch=args.fail_at_epoch,
        fail_scope=args.fail_scope)
    print(f"[study] {experiment}: {num_samples} trials ({num_samples - earlier} new; optimising "
          f"{', '.join(plan.objectives)}), {resources.max_concurrent_trials} at a time, "
          f"{resources.workers_per_trial} workers x {resources.worker_bundle()} each; "
          f"{cfg.optim.epochs} epochs; storage {storage}", flush=True)

    # 4. MLflow: one parent run per study (reopened on --resume); trial runs nest under it.
    manifest_path = study_dir / "study.json"
    previous = (json.loads(manifest_path.read_text()) if (args.resume or continued) and manifest_path.is_file()
                else {})
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
                "data_root": cfg.data.root, "resources": asdict(resources), "searched": sorted(search),
                "objectives": plan.objectives, "optuna_storage": optuna_spec, "optuna_study": experiment,
                "num_samples": num_samples, "epochs": cfg.optim.epochs, "model_name": registered_model_name(args)}
    manifest.update(plan=data_pass.plan, cache_dirs=data_pass.cache_dirs)
    log_to_parent(tracking_uri, parent, data_pass)
    write_manifest(study_dir, manifest)
    # ASHA keeps its rungs in the study folder; a resumed Tuner's scheduler (unpickled from the Tuner's
    # own file) reads them back, so this one must not clear them then.
    scheduler = make_scheduler(cfg, args, None if restoring else study_dir / ASHA_STATE)
    describe_study(tracking_uri, parent, manifest, type(scheduler).__name__ == "MeasuredASHA")

    # 5. Tune: seeded TPE over the YAML space, its history in the Optuna storage; ASHA on the first
    # objective at validated epochs. Tune's table replaces the per-result lines (verbose=1).
    if isinstance(metric, list):
        # val_stability exists only in a trial's final result; Tune's check that every result holds
        # every searched metric would stop the trial at its first epoch. The searcher tells Optuna
        # FAIL when a final result lacks one (studies/search_space.py).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not args.verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's progress_reporter is used only by the classic output
    run_config = dict(progress_reporter=None if args.verbose else progress_reporter(search),
                      verbose=2 if args.verbose else 1)
    trainable = tune.with_resources(trainable_mod.train_func, resources.trial_resources())
    if restoring:
        tuner = tune.Tuner.restore(tuner_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=trainable_mod.study_config(cfg, settings, search),
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(metric, mode, args.seed, n_startup_trials=min(10, num_samples // 2 + 1),
                                         storage=optuna_store, study_name=experiment),
                scheduler=scheduler,
                num_samples=num_samples - earlier, max_concurrent_trials=resources.max_concurrent_trials,
                trial_name_creator=lambda t: f"trial_{t.trial_id}",
                trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=1),
                callbacks=[TrialRuns(tracking_uri, parent, tags, journal=study_dir / JOURNAL_NAME),
                           *result_loggers()], **run_config,
            ),
        )
    grid = tuner.fit()

    # 6-7. Cross-site numbers for trials ASHA stopped, best trial, parent summary, export.
    summary = finish_study(grid, manifest, export=not args.no_export, export_trial=args.export_trial)
    summary["wall_time_s"] = time.time() - started
    summary["optuna_storage"] = optuna_spec
    manifest.update({"wall_time_s": summary["wall_time_s"], "best_trial_id": summary.get("best_trial_id")})
    write_manifest(study_dir, manifest)
    return summary


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from studies.local_cluster import needs_private_head, reserve_auth, study_cluster

    if needs_private_head(args.address):
        reserve_auth()  # before anything imports ray: it reads the auth mode once
    console_defaults(args.verbose)
    try:
        plan = prepare(args)  # every problem at once, before a Ray head, a phantom or MLflow exist
        with study_cluster(args.address) as address:  # disconnects this driver before a private head stops
            args.address = address
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
    print(f"Optuna study:   optuna-dashboard {summary.get('optuna_storage')}")
    return 0 if summary.get("best_trial_id") else 1


if __name__ == "__main__":
    sys.exit(main())
