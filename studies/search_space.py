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


def make_searcher(metric: str, mode: str, seed: int, n_startup_trials: int = 10):
    """Seeded TPE through Ray's OptunaSearch, aware of trials that ASHA stopped.

    Ray hands Optuna a stopped trial's last result, which Optuna would record as COMPLETE with an
    early, partial score. Here a trial whose last result lacks ``final`` is told as PRUNED (its
    per-epoch values were already reported as intermediate values, which TPE uses for pruned
    trials), so only fully trained trials compete on the objective. An errored trial, or a final
    objective that is not a finite number, is told as FAIL (Ray would tell an errored trial's last
    partial score as COMPLETE, and Optuna refuses a NaN and leaves the trial RUNNING).
    """
    import math

    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from studies.trainable import FINAL_KEY

    class PruneAwareOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            value = (result or {}).get(self.metric)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if error or (result is not None and result.get(FINAL_KEY) and not finite):
                result, error = None, True  # OptunaSearch tells Optuna FAIL
            elif result is not None and not result.get(FINAL_KEY):
                result = None  # no value: OptunaSearch tells Optuna PRUNED
            super().on_trial_complete(trial_id, result, error)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    return PruneAwareOptunaSearch(metric=metric, mode=mode, sampler=sampler)
