"""The driver's preflight of a study: flags, config, search space, objectives and data, checked
before anything starts (no Ray head, no phantom, no MLflow run, no file written).

:func:`prepare` collects every problem into one :class:`StudyError` (exit status 2), each naming
its flag, dotted field or file; :func:`build_parser` is the command line of ``studies/tune.py``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualssl.cli import add_plan_flags
from dualssl.config import Config, ConfigError
from dualssl.recipes import apply_recipe
from studies.objectives import OBJECTIVES, parse_objectives
from studies.search_space import DEFAULT_SEARCH_SPACE, load_search_space

DEFAULT_STORAGE = Path.home() / "dualssl-studies"
PHANTOM_SITES = ["pv_standard", "native_thick", "lowdose_sharp", "cone_beam"]


SLOW_CALLBACK_WARNING_S = 10.0
"""Tune warns of every callback slower than 0.5 s (``TUNE_WARN_THRESHOLD_S``): on a busy laptop the
MLflow logger of each result is, and the warnings drowned the progress table."""


def console_defaults(verbose: bool) -> None:
    """What the terminal shows: without ``--verbose``, Tune's slow-callback warnings only above
    :data:`SLOW_CALLBACK_WARNING_S`, and neither MLflow's INFO lines (database set-up) nor its
    artifact download bars. Call it before Ray Tune and MLflow are imported (they read these once);
    a value the user set is kept."""
    import logging

    if verbose:
        return
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", str(SLOW_CALLBACK_WARNING_S))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    _drop_warnings(QUIET_WARNINGS)


QUIET_WARNINGS = ("Add type hints to the `predict` method",)
"""MLflow's advice when the export defines the pyfunc class (``dualssl/serving.py``): the model takes
a tensor and its signature is given. MLflow raises it under its own ``simplefilter("once")``, which
overrides any ``warnings.filterwarnings``, so it is dropped where warnings are shown."""


def _drop_warnings(fragments: tuple[str, ...]) -> None:
    import warnings

    show = warnings.showwarning
    if getattr(show, "dualssl_quiet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not any(f in str(message) for f in fragments):
            show(message, category, filename, lineno, file, line)

    showwarning.dualssl_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studies/tune.py", description="Hyperparameter study of dualssl on Ray Tune: "
                                "OptunaSearch (TPE) + ASHA + MLflow, then export.")
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
    p.add_argument("--model-name", default=None,
                   help="registered model of the export (default dualssl-pancreas); an oracle study registers "
                        "NAME-oracle, a smoke study NAME-smoke (studies/export_best.py)")
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
    p.add_argument("--objectives", default="val_dice",
                   help="what the search optimises, comma-separated, on source-validation cases only: "
                        f"{', '.join(OBJECTIVES)} (default val_dice; two give a Pareto front)")
    p.add_argument("--optuna-storage", default=None,
                   help="Optuna storage: an RDB URL, e.g. postgresql://... (default: a journal file "
                        "STUDY/optuna.journal, written by this driver only)")
    p.add_argument("--export-trial", default=None, metavar="TRIAL_ID",
                   help="export this trial instead of the one the selection rule picks")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's per-worker logs and Train's per-report lines on the terminal")
    add_plan_flags(p)  # --plan auto: spacing, HU window, patch from the source site's fingerprint
    p.add_argument("--fail-at-epoch", type=int, default=-1, help=argparse.SUPPRESS)  # tests: fault injection
    # tests: "trial" kills a worker of every trial once, "study" of the first trial to get there only
    p.add_argument("--fail-scope", choices=("trial", "study"), default="trial", help=argparse.SUPPRESS)
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


def phantom_cases_per_site(args: argparse.Namespace) -> int:
    """Cases a site of the study's own phantom (smoke 4, else 5); the recipes' ``data.val_fraction``
    keeps 2 of them for validation (``val_stability`` is a std over them)."""
    return 4 if args.smoke_test else 5


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
    objectives: list[str] = field(default_factory=lambda: ["val_dice"])
    """``--objectives``: names in :data:`studies.objectives.OBJECTIVES`."""


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


OWNER_FILE = "dualssl_study_dir.txt"
"""Written into ``<storage>/<experiment>`` (Ray Tune's folder: trials, checkpoints, the Tuner's state) by
the study that uses it, naming that study's folder."""


def storage_owner_problem(storage: str, experiment: str, study_dir: Path) -> str | None:
    """Why ``study_dir`` must not use ``<storage>/<experiment>``: another study's Tune folder (a second study
    there would overwrite its Tuner state, so ``--resume`` would restore the wrong study); None if free.

    Two studies collide there when they share ``--storage-path`` and ``--experiment-name`` but not
    ``--study-dir``. Remote storage (``s3://``...) is not checked.
    """
    if is_uri(storage):
        return None
    marker = Path(storage) / experiment / OWNER_FILE
    if not marker.is_file():
        return None
    owner = Path(marker.read_text().strip())
    if owner == study_dir:
        return None
    return (f"--study-dir {study_dir}: the Ray Tune folder {marker.parent} (trials, checkpoints, Tuner state) "
            f"belongs to the study in {owner}; give this study its own --experiment-name or --storage-path, "
            f"or pass --study-dir {owner} to continue that study")


def claim_storage(storage: str, experiment: str, study_dir: Path) -> None:
    """Mark ``<storage>/<experiment>`` as ``study_dir``'s (see :func:`storage_owner_problem`)."""
    if is_uri(storage):
        return
    folder = Path(storage) / experiment
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_FILE).write_text(str(study_dir))


def prepare(args: argparse.Namespace) -> StudyPlan:
    """Check flags, config, search space and data on the driver; raises :class:`StudyError`
    naming every problem. Starts nothing and writes nothing."""
    problems: list[str] = []
    notes: list[str] = []
    storage = study_dir = experiment = cfg = search = None
    objectives = ["val_dice"]
    try:
        objectives = parse_objectives(args.objectives)
    except ConfigError as exc:
        problems.append(str(exc))
    if len(objectives) > 1 and args.selection == "oracle":
        problems.append(f"--objectives {args.objectives} with --selection oracle: the objectives are "
                        "source-validation numbers; rank on the unseen sites with one objective only")
    try:
        storage, study_dir, experiment = resolve_paths(args)
        if owned := storage_owner_problem(storage, experiment, study_dir):
            problems.append(owned)
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
    return StudyPlan(storage, study_dir, experiment, cfg, search, notes, objectives)


def stability_problem(cfg: Config, objectives: list[str]) -> str | None:
    """``val_stability`` is a std over source validation cases: refuse a split that leaves fewer than 2."""
    if "val_stability" not in objectives:
        return None
    from dualssl.data.datalist import load_datalist, split_cases

    split = split_cases(load_datalist(cfg.data.root), cfg.data.source_sites, cfg.data.val_fraction,
                        cfg.data.split_seed)
    if len(split.val) >= 2:
        return None
    return (f"--objectives val_stability: the std of per-case Dice needs at least 2 source validation cases; "
            f"data.val_fraction={cfg.data.val_fraction} leaves {len(split.val)} of {cfg.data.root}: raise it, "
            "e.g. --set data.val_fraction=0.4")
