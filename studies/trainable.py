"""One Tune trial: the Ray Train driver for one hyperparameter setting.

Ray Train V2 no longer runs as ``Tuner(trainer)``: a Tune function trainable calls
``TorchTrainer(...).fit()`` itself, with ``TuneReportCallback`` in the Train ``RunConfig`` so that
every epoch reaches Tune (ASHA, Optuna, MLflow). The Train run is named after the trial id, so a
trial that Tune retries finds its own run in storage and resumes from its last checkpoint.

The trial's ``config`` is flat: every ``Config`` leaf under its dotted name (``loss.tau``, ...;
searched or constant) plus ``study.*`` settings. MLflow logs exactly these as parameters.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from dualssl.config import Config, ConfigError
from studies.crosssite import flat_metrics, remote_evaluate
from studies.throughput import time_breakdown
from studies.train_loop import ASHA_KEY, LOOP_START_KEY, SCORE_KEY, train_loop_per_worker

FINAL_KEY = "final"
"""1.0 in the last result of a trial that finished training and its cross-site evaluation."""
ORACLE_METRIC = "oracle/mean_unseen_dice"
"""``--selection oracle`` ranks on this: mean Dice over the selection part of the unseen sites
(``studies/crosssite.py``); the reported numbers come from their report part."""


@dataclass
class TrialSettings:
    """The ``study.*`` keys of a trial config."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    train_storage: str = ""
    """Absolute path or URI where the Train runs of this study live (shared storage on clusters)."""
    selection: str = "source-val"
    """'source-val' (best source-validation Dice) or 'oracle' (mean Dice on the unseen sites)."""
    max_failures: int = 2
    keep_checkpoints: int = 2
    fail_at_epoch: int = -1
    """Tests only: kill the last worker once after this epoch (-1: never) ..."""
    fail_scope: str = "trial"
    """... in every trial ("trial") or in the first trial to finish that epoch ("study")."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys applied AFTER the flat keys (searched or constant), e.g. one cell of a
    ``tune.grid_search([{...}, ...])``; it may also hold ``study.arm`` / ``study.cell`` labels."""
    cell: str = ""
    """Label of this trial's cell of a grid study (an MLflow tag ``cell``); empty: none."""
    arm: str = ""
    """Label of the study arm (``dualssl.recipes.ARMS`` name; an MLflow tag ``arm``). A label only:
    the arm's config keys go in ``overrides``."""
    peer: str = ""
    """A peer system that runs this cell instead of our engine (``dualssl.peers.PEERS``, e.g. nnunet;
    ``dualssl.recipes.PEER_ARMS``); empty: our engine. See ``studies/peer_cell.py``."""
    peer_plan: str = "auto"
    """A peer cell's plan: 'capped' (CPU-sized), 'full', or 'auto' (capped without a GPU, else full)."""
    budget: int = 0
    """Label of the cell's training budget in iterations (``domain_shift.py --budgets``; an MLflow tag
    ``budget``); 0: none. A label only: the budget's ``optim.epochs`` goes in ``overrides``."""


class TrialTorchTrainer(TorchTrainer):
    """``TorchTrainer`` without Ray Data's plumbing when the run has no Ray ``datasets`` (ours never has:
    the engine loads its own data).

    Ray Train 2.60 starts a ``DatasetManager`` actor per run and sends the driver's ``DataContext`` to
    every worker before the train loop starts, datasets or not: on 2 cores that is ~0.9 s (median) of
    a 6 s worker-group start-up (``benchmarks/worker_startup.py``, ``ray-stock`` against ``dualssl``). Its
    ``DatasetsCallback`` is the only thing dropped; with datasets the trainer is Ray's own. Where a Ray
    release changes the callback's name or the private hook, this silently becomes the stock trainer.
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if type(cb).__name__ != "DatasetsCallback"]


_LABELS = ("study.arm", "study.cell", "study.peer", "study.peer_plan", "study.budget")
"""study.* keys allowed inside ``study.overrides`` (labels of the cell and its budget, and a peer arm's system)."""


def _set_setting(settings: TrialSettings, key: str, value: Any) -> None:
    names = {f.name for f in fields(TrialSettings)}
    name = key[len("study."):]
    if name not in names:
        raise ValueError(f"{key}: unknown study setting; known: {', '.join(sorted(names))}")
    if name != "overrides":
        setattr(settings, name, type(getattr(settings, name))(value))
    elif isinstance(value, Mapping):
        settings.overrides = dict(value)
    else:
        raise ConfigError(f"study.overrides: expected a mapping of dotted config keys to values, "
                          f"got {type(value).__name__} {value!r}")


def split_config(config: dict[str, Any]) -> tuple[Config, TrialSettings]:
    """Flat trial config -> (validated Config, TrialSettings).

    Order: the flat dotted keys (constants and searched values), then ``study.overrides`` on top.
    An error names the key (``study.overrides: loss.tauu: unknown field ...``).
    """
    cfg, settings = Config(), TrialSettings()
    for key, value in config.items():
        if key.startswith("study."):
            _set_setting(settings, key, value)
        else:
            cfg.set(key, value)
    for key, value in settings.overrides.items():
        try:
            if key in _LABELS:
                _set_setting(settings, key, value)
            elif key.startswith("study."):
                raise ConfigError(f"only the labels {', '.join(_LABELS)} may be set here, not {key}")
            else:
                cfg.set(key, value)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"study.overrides: {exc}") from exc
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (after study.overrides {settings.overrides})" if settings.overrides
                          else str(exc)) from exc
    return cfg, settings


def study_config(cfg: Config, settings: TrialSettings, search: dict[str, Any]) -> dict[str, Any]:
    """The Tuner's ``param_space``: every config leaf (search domains override) plus ``study.*``."""
    space: dict[str, Any] = dict(cfg.flat())
    space.update(search)
    space.update({f"study.{f.name}": getattr(settings, f.name) for f in fields(TrialSettings)})
    return space


def cell_tags(cfg: Config, settings: TrialSettings) -> dict[str, str]:
    """MLflow tags of a trial's cell: seed and source site always, arm and cell when labelled."""
    tags = {"seed": str(cfg.optim.seed), "source_site": ",".join(cfg.data.source_sites),
            "selection": settings.selection}
    if settings.arm:
        tags["arm"] = settings.arm
    if settings.cell:
        tags["cell"] = settings.cell
    if settings.budget:
        tags["budget"] = str(settings.budget)
    return tags


def best_checkpoint(result: ray.train.Result) -> tuple[ray.train.Checkpoint, dict[str, Any]]:
    """The checkpoint of the best epoch by the selection metric (``Result.checkpoint`` is the latest)."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(SCORE_KEY, -1.0) > -0.5]
    if not candidates:
        candidates = list(result.best_checkpoints or [])
    if not candidates:
        raise RuntimeError(f"{result.path}: the Train run reported no checkpoint")
    return max(candidates, key=lambda cm: cm[1].get(SCORE_KEY, -1.0))


def checkpoint_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """Every epoch's metrics, from the engine state inside a Ray Train checkpoint."""
    from dualssl.engine import load_checkpoint
    from studies.train_loop import CHECKPOINT_FILE

    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)["history"]


def write_artifacts(folder: Path, cfg: Config, history: list[dict[str, float]],
                    files: dict[str, bytes], extra: dict[str, Any]) -> Path:
    """config.yaml, history.json, progress.png and the evaluation files of one trial."""
    from dualssl.engine.callbacks import plot_progress

    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.yaml")
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()} for h in history]
    (folder / "history.json").write_text(json.dumps(clean, indent=1))
    if history:
        plot_progress(history, folder / "progress.png")
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    (folder / "trial.json").write_text(json.dumps(extra, indent=1, default=str))
    return folder


def objective(selection: str, best_val: float, cross: dict[str, float]) -> float:
    """The number Optuna maximises and the study ranks trials by: the best epoch's source-validation
    selection metric, or (oracle) :data:`ORACLE_METRIC` of that epoch's checkpoint; NaN if absent."""
    if selection == "oracle":
        return float(cross.get(ORACLE_METRIC, float("nan")))
    return float(best_val)


def train_func(config: dict[str, Any]) -> None:
    """Tune function trainable: train with Ray Train, then measure the best epoch on unseen sites."""
    # 1. Unpack the config.
    started = time.time()
    cfg, settings = split_config(config)
    trial_id = tune.get_context().get_trial_id()
    if settings.peer:  # an arm that is another system (nnU-Net): its own pipeline in the cell's resources
        return _peer_cell(cfg, settings, trial_id, started)
    use_gpu = settings.gpus_per_worker > 0
    resources = {"CPU": settings.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = settings.gpus_per_worker

    # 2. Train: one Ray Train run per trial, named by the trial id so that a retry resumes it.
    trainer = TrialTorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(), "threads": max(1, int(settings.cpus_per_worker)), "trial_started": started,
            "fail_at_epoch": settings.fail_at_epoch if settings.fail_at_epoch >= 0 else None,
            "fail_marker": (f"{settings.train_storage}/.fault_injected" if settings.fail_scope == "study"
                            else f"{settings.train_storage}/train_{trial_id}/.fault_injected")
            if settings.fail_at_epoch >= 0 else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",
            storage_path=settings.train_storage,
            # controller_failure_limit: an unschedulable worker group fails instead of retrying forever;
            # 5 tries of Ray's 60 s start timeout leave time for the reservation of a trial that ASHA
            # just stopped to be released on a loaded machine.
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures, controller_failure_limit=5),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints,
                                                         checkpoint_score_attribute=SCORE_KEY,
                                                         checkpoint_score_order="max"),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    fit_done = time.time()

    # 3. The best epoch's checkpoint, from the reported metrics (not Result.checkpoint).
    best, best_metrics = best_checkpoint(result)
    history = checkpoint_history(result.checkpoint)

    # 4. Cross-site evaluation of that checkpoint, with the CPUs the worker group just gave back
    # (torch threads = those CPUs) and one worker's GPU.
    outcome = remote_evaluate(best, settings.cpus_per_worker * settings.workers, settings.gpus_per_worker)
    eval_done = time.time()
    cross = flat_metrics(outcome["summary"])
    selection_metric = cfg.eval.selection_metric
    best_val = float(best_metrics.get(selection_metric, float("nan")))

    # 5. Final report: cross-site numbers, the objective and the trial's artifacts.
    final = {
        **cross,
        FINAL_KEY: 1.0,
        "objective": objective(settings.selection, best_val, cross),
        f"best_{selection_metric}": best_val,
        "best_epoch": int(best_metrics.get("epoch", -1)),
        ASHA_KEY: math.nan,  # Tune wants the scheduler's metric in every result; ASHA skips NaN
        "epochs_done": int(history[-1]["epoch"]) + 1 if history else 0,
        "timesteps_total": int(history[-1]["epoch"]) + 1 if history else 0,
    }
    info = {"trial_id": trial_id, "best_checkpoint": best.path, "train_run": result.path,
            "worst_site": outcome["summary"].get("across_sites", {}).get("worst_site"),
            "selection": settings.selection}
    with tempfile.TemporaryDirectory(prefix="dualssl-trial-") as tmp:
        write_artifacts(Path(tmp), cfg, history, outcome["files"], info)
        # where the trial's time went (studies/throughput.py), as time/* metrics of its result and run
        final.update(time_breakdown(history, started, fit_done, eval_done, time.time(),
                                    (result.metrics or {}).get(LOOP_START_KEY)))
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


def _peer_cell(cfg: Config, settings: TrialSettings, trial_id: str, started: float) -> None:
    """A peer arm's cell (``studies/peer_cell.py``), reported like ours: cross-site numbers, artifacts."""
    from studies.peer_cell import run_peer_cell

    outcome = run_peer_cell(cfg, settings, trial_id)
    cross = flat_metrics(outcome["summary"])
    best_val = float(outcome["summary"]["per_site"].get(cfg.data.source_sites[0], {}).get("dice_mean", math.nan))
    final = {**cross, FINAL_KEY: 1.0, "objective": objective(settings.selection, best_val, cross),
             f"best_{cfg.eval.selection_metric}": best_val, "best_epoch": outcome["epochs"] - 1, ASHA_KEY: math.nan,
             "epochs_done": outcome["epochs"], "timesteps_total": outcome["epochs"],
             **{f"time/{k}": v for k, v in outcome["seconds"].items()}, "time/total_s": time.time() - started}
    with tempfile.TemporaryDirectory(prefix="dualssl-trial-") as tmp:
        write_artifacts(Path(tmp), cfg, [], outcome["files"], {"trial_id": trial_id, **outcome["info"]})
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))
