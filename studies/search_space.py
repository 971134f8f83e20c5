"""The YAML search space: dotted config names -> Ray Tune domains (OptunaSearch converts them).

Format (``studies/search_space.yaml``)::

    parameters:
      loss.lambda_con: {type: loguniform, low: 0.01, high: 1.0}
      loss.corruption_ratio: {type: uniform, low: 0.1, high: 0.9}
      model.dropout: {type: choice, values: [0.0, 0.1]}

Each name must be a config field, and each endpoint (or choice) a value that the field accepts:
the loader sets it on a fresh ``Config`` and runs the field's validation, so a typo or an
out-of-range bound fails here, naming the file and the parameter, instead of inside a trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dualssl.config import Config, ConfigError

DEFAULT_SEARCH_SPACE = Path(__file__).with_name("search_space.yaml")
TYPES = ("loguniform", "uniform", "choice")


def _check_value(path: Path, name: str, value: Any) -> None:
    cfg = Config()
    try:
        cfg.set(name, value)
        getattr(cfg, name.split(".", 1)[0]).validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: parameter {name}: {exc}") from exc


def read_search_space(path: str | Path = DEFAULT_SEARCH_SPACE) -> dict[str, dict[str, Any]]:
    """Parse and validate the YAML file; returns ``{dotted_name: spec}`` (specs as in the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found (default: {DEFAULT_SEARCH_SPACE})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    params = tree.get("parameters") if isinstance(tree, dict) else None
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: expected a top-level 'parameters:' mapping of dotted names to ranges")
    for name, spec in params.items():
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{path}: parameter {name}: give 'type:' one of {', '.join(TYPES)}")
        if spec["type"] == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: parameter {name}: a choice needs a non-empty 'values:' list")
            for value in values:
                _check_value(path, name, value)
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
            raise ConfigError(f"{path}: parameter {name}: needs numeric 'low' < 'high', got {low!r}, {high!r}")
        if spec["type"] == "loguniform" and low <= 0:
            raise ConfigError(f"{path}: parameter {name}: loguniform needs low > 0 (got {low}); "
                              "use type: uniform to include 0")
        _check_value(path, name, low)
        _check_value(path, name, high)
    return params


def load_search_space(path: str | Path = DEFAULT_SEARCH_SPACE) -> dict[str, Any]:
    """``{dotted_name: ray.tune domain}`` for the Tuner's ``param_space``."""
    from ray import tune

    domains: dict[str, Any] = {}
    for name, spec in read_search_space(path).items():
        if spec["type"] == "loguniform":
            domains[name] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif spec["type"] == "uniform":
            domains[name] = tune.uniform(float(spec["low"]), float(spec["high"]))
        else:
            domains[name] = tune.choice(list(spec["values"]))
    return domains


JOURNAL_FILE = "optuna.journal"
"""The study's Optuna journal in the study folder (``--optuna-storage`` replaces it with an RDB URL)."""


def optuna_storage(spec: str | Path):
    """An Optuna storage: an RDB URL (``postgresql://...``, ``mysql://...``, ``sqlite:///...``) or a
    journal file path (``JournalStorage(JournalFileBackend(path))``: append-only, safe to reopen,
    readable by ``optuna-dashboard PATH``). Only the study driver writes it."""
    import optuna

    text = str(spec)
    if "://" in text:
        return optuna.storages.RDBStorage(text)
    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(text))


def open_study(storage, study_name: str, modes: list[str], where: str):
    """Create or load the Optuna study ``study_name``; an existing one must have the same directions.

    ``where`` names the storage in the error (the journal path or ``--optuna-storage``)."""
    import optuna

    directions = ["minimize" if m == "min" else "maximize" for m in modes]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise ConfigError(f"{where}: Optuna study {study_name} optimises {found}, not {directions}; give "
                          "the --objectives it was started with, or another --experiment-name")
    return study


def optuna_study_for(url: str | None, study_dir: Path, experiment: str, modes: list[str], verbose: bool = False):
    """``(storage, spec, study)``: the study's Optuna storage (journal file in the study folder, or
    the RDB ``url`` of ``--optuna-storage``) and its study named after the experiment, created or loaded."""
    import optuna

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = url or str(Path(study_dir) / JOURNAL_FILE)
    storage = optuna_storage(spec)
    return storage, spec, open_study(storage, experiment, modes, f"--optuna-storage {url}" if url else spec)


def finished_trials(study) -> int:
    """Trials of ``study`` that ended (complete, pruned or failed)."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(t.state in done for t in study.get_trials(deepcopy=False))


def make_searcher(metric: str | list[str], mode: str | list[str], seed: int, n_startup_trials: int = 10,
                  storage=None, study_name: str | None = None):
    """Seeded TPE through Ray's OptunaSearch, aware of trials that ASHA stopped.

    Ray hands Optuna a stopped trial's last result, which Optuna would record as COMPLETE with an
    early, partial score. Here a trial whose last result lacks ``final`` is told as PRUNED (its
    per-epoch values were already reported as intermediate values, which TPE uses for pruned
    trials), so only fully trained trials compete on the objective. An errored trial, or a final
    objective that is not a finite number, is told as FAIL (Ray would tell an errored trial's last
    partial score as COMPLETE, and Optuna refuses a NaN and leaves the trial RUNNING).

    ``metric``/``mode`` lists make a multi-objective search (``studies.objectives``): the objective
    values are derived from the final result here (``val_stability`` is not a reported key).
    ``storage``/``study_name``: an Optuna storage holding the study (a journal file), so that a
    resumed or continued study keeps TPE's whole history; OptunaSearch loads it if it exists.
    """
    import math

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from studies.objectives import objective_values
    from studies.trainable import FINAL_KEY

    class PruneAwareOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            # A driver killed after Optuna recorded a trial's end but before Tune's next experiment
            # snapshot (every >= 10 s) leaves that trial RUNNING in Tune's state: `--resume` runs it
            # again, and reporting to its finished Optuna trial would raise UpdateFinishedTrialError
            # and end the study. Optuna keeps what it recorded; the rerun is not told again.
            trial = self._ot_trials.get(trial_id)
            if trial is not None and trial_id not in self._completed_trials:
                running = self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if trial.number not in {t.number for t in running}:
                    self._completed_trials.add(trial_id)
            if trial_id not in self._completed_trials:
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            names = self.metric if isinstance(self.metric, list) else [self.metric]
            if result is not None and isinstance(self.metric, list):
                result = {**result, **objective_values(result, names)}
            values = [(result or {}).get(n) for n in names]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            if error or (result is not None and result.get(FINAL_KEY) and not finite):
                result, error = None, True  # OptunaSearch tells Optuna FAIL
            elif result is not None and not result.get(FINAL_KEY):
                result = None  # no value: OptunaSearch tells Optuna PRUNED
            super().on_trial_complete(trial_id, result, error)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    return PruneAwareOptunaSearch(metric=metric, mode=mode, sampler=sampler, storage=storage,
                                  study_name=study_name)
