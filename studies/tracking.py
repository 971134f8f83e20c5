"""MLflow for the study: one parent run, one nested run per trial, all written by the driver.

Logging from the Train workers (``setup_mlflow``) would open a new run each time a worker group
restarts; here every MLflow call happens on the driver side: :class:`TrialRuns` (a Tune logger
callback) opens each trial's run under the parent (tag ``mlflow.parentRunId``), named by the trial
id, logs its config as parameters and every result as metrics, and keeps the writes that a tracking
server which does not answer could not take (studies/pending_writes.py); the study's
end fills in what only the driver knows (cross-site numbers of stopped trials, artifacts, the
parent's summary and the exported model).

Each trial's run records its dataset as an MLflow input (:func:`dataset_input`: name, a digest of
the case list and the preprocessing hash, the data root as source, per-site case counts of the
split as profile); the parent run's description (``mlflow.note.content``) says in one paragraph
what the study was (:func:`study_description`). System metrics are not logged: MLflow's monitor
needs ``psutil`` (not a dependency) and samples only the host of the process that owns the run,
which for these driver-written runs is the driver's node, not where the trials train.

MLflow 3 stores runs in a database by default; the default tracking URI of a study is a sqlite
file in the study folder (``sqlite:////abs/study/mlflow.db``), with its artifacts beside it in
``study/mlartifacts`` (:func:`sqlite_artifacts`: a sqlite store would otherwise put them in
``./mlruns`` of whatever folder the driver was started from), and clusters use a server
(``cluster/mlflow.yaml``).
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"


def dataset_input(cfg) -> Any:
    """``mlflow.entities.DatasetInput`` of a trial's data: the cases and preprocessing it trains on.

    name: the data root's folder name; digest: sha256 of the sorted case list (id, site, image and
    label paths) plus ``preprocessing_hash(cfg.data)`` and the split settings; source: the root;
    profile: cases per site in train / val / test."""
    import hashlib
    import json

    from mlflow.entities import Dataset

    from dualssl.data.cache import preprocessing_hash
    from dualssl.data.datalist import load_datalist, split_cases

    cases = load_datalist(cfg.data.root)
    split = split_cases(cases, cfg.data.source_sites, cfg.data.val_fraction, cfg.data.split_seed)
    listing = sorted((c.case_id, c.site, str(c.image), str(c.label)) for c in cases)
    key = {"cases": listing, "preprocessing": preprocessing_hash(cfg.data), "sources": cfg.data.source_sites,
           "val_fraction": cfg.data.val_fraction, "split_seed": cfg.data.split_seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    sites = sorted({c.site for c in cases})
    profile = {site: {"train": sum(c.site == site for c in split.train), "val": sum(c.site == site for c in split.val),
                      "test": len(split.test.get(site, []))} for site in sites}
    dataset = Dataset(name=Path(cfg.data.root).name, digest=digest, source_type="local",
                      source=json.dumps({"uri": str(cfg.data.root)}),
                      profile=json.dumps({"num_cases": len(cases), "preprocessing_hash": preprocessing_hash(cfg.data),
                                          "sites": profile}))
    return training_input(dataset)


def training_input(dataset) -> Any:
    """``dataset`` (an ``mlflow.entities.Dataset``) as a run's input in the training context."""
    from mlflow.entities import DatasetInput, InputTag

    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def study_description(plan: dict[str, Any]) -> str:
    """One paragraph for the parent run's description: data, sites, protocol, budget."""
    objectives = ", ".join(plan.get("objectives") or ["val_dice"])
    unseen = ", ".join(plan.get("unseen_sites") or []) or "none"
    return (f"Hyperparameter study {plan['experiment']} of dualssl on {plan['data_root']} "
            f"({plan.get('n_cases', '?')} cases): trained on source site(s) {', '.join(plan['source_sites'])}, "
            f"measured on unseen site(s) {unseen}. Search: Optuna TPE over {', '.join(plan['searched'])} "
            f"optimising {objectives} on source-validation cases only (selection {plan['selection']}); "
            f"{plan.get('scheduler', 'ASHA')}. Budget: {plan['num_samples']} trials of {plan['epochs']} epochs, "
            f"{plan['resources']['max_concurrent_trials']} at a time, {plan['resources']['workers_per_trial']} "
            f"DDP worker(s) each. Unseen-site numbers are reported for every trial but "
            f"{'rank the trials (oracle)' if plan['selection'] == 'oracle' else 'never used for selection'}. "
            f"Optuna study: {plan.get('optuna_storage', 'in memory')}.")


def git_revision(repo: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=repo or Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _chunks(items: list, size: int = 100):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for chunk in _chunks(items):
        client.log_batch(run_id, params=chunk)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only (NaN kept; booleans, strings and the ``config/...`` copies dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("config/")}


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int = 0, timestamp_ms: int | None = None) -> None:
    """:func:`numeric_metrics` of ``metrics`` at ``step`` (timestamp: now unless given), in batches."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    items = [Metric(k, v, now, int(step)) for k, v in numeric_metrics(metrics).items()]
    for chunk in _chunks(items, 500):
        client.log_batch(run_id, metrics=chunk)


def default_tracking(study_dir: Path, tracking_uri: str | None) -> str:
    """The given tracking URI, else the sqlite file of the study folder."""
    return tracking_uri or f"sqlite:///{study_dir / 'mlflow.db'}"


def sqlite_artifacts(tracking_uri: str) -> str | None:
    """``file://`` URI of ``mlartifacts`` beside a ``sqlite:///`` store's file (None for any other
    store: a server or another database decides where its artifacts go). A sqlite store would
    otherwise put a new experiment's artifacts in ``./mlruns`` of the process's working folder."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def start_parent_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                     params: dict[str, Any], run_id: str | None = None) -> str:
    """Create (or reopen, with ``run_id``) the study's parent run; returns its id. The study's first
    MLflow call: from here on the driver's HTTP retries are short (``pending_writes.client_defaults``).
    A new experiment in a sqlite store keeps its artifacts beside the store (:func:`sqlite_artifacts`);
    an existing one keeps its own location."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from studies.pending_writes import client_defaults

    client_defaults()
    mlflow.set_tracking_uri(tracking_uri)
    artifact_location = sqlite_artifacts(tracking_uri)
    if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException as exc:  # another driver created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    exp = mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient(tracking_uri)
    if run_id is None:
        run_id = client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id
        log_params(client, run_id, params)
    return run_id


def trial_runs(tracking_uri: str, parent_run_id: str) -> dict[str, str]:
    """``{trial_id: run_id}`` of the trial runs nested under ``parent_run_id``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=5000)
    return {r.data.tags["trial_id"]: r.info.run_id for r in runs if "trial_id" in r.data.tags}


def describe_study(tracking_uri: str, parent: str, manifest: dict[str, Any], asha: bool) -> None:
    """The parent run's description (``mlflow.note.content``): one paragraph on the study."""
    import mlflow

    from dualssl.data.datalist import load_datalist
    cases = load_datalist(manifest["data_root"])
    unseen = sorted({c.site for c in cases} - set(manifest["source_sites"]))
    kind = "ASHA early stopping on val_dice" if asha else "no early stopping"
    text = study_description({**manifest, "n_cases": len(cases), "unseen_sites": unseen, "scheduler": kind})
    mlflow.MlflowClient(tracking_uri).set_tag(parent, NOTE_TAG, text)


class TrialRuns(LoggerCallback):
    """A Tune logger callback with one MLflow run per trial id under the study's parent run.

    The run carries the study's tags and the trial's own (trial id, config hash, cell), its config as
    parameters, its dataset as an input, and every result as metrics with step = epoch
    (``timesteps_total``). A resumed study reuses each trial's run. Every write goes through
    :class:`~studies.pending_writes.PendingWrites`: while the tracking server does not answer, the
    trials go on and their writes wait (in ``journal`` when given) and are logged when it answers;
    the study's end waits up to ``drain_s`` for it.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, tags: dict[str, str],
                 journal: Path | None = None, retry_s: float = 30.0, drain_s: float = 300.0):
        # (the experiment is the parent run's)
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.tags = {**tags, PARENT_TAG: parent_run_id}
        self.journal, self.retry_s, self.drain_s = journal, retry_s, drain_s
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._datasets: dict[tuple, Any] = {}
        self._client = None
        self.pending = None

    def setup(self, *args, **kwargs) -> None:
        """At the experiment's start, fresh or restored (Tune pickles its callbacks with the Tuner, so
        the journal of a killed driver is read here, not in ``__init__``)."""
        from studies.pending_writes import PendingWrites

        self.pending = PendingWrites(self._apply, self.journal, self.retry_s, where=f"MLflow at {self.tracking_uri}")
        self.pending.flush()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "pending": None, "_runs": {}}

    # -- Tune's hooks: each becomes one write ----------------------------------------------------
    def log_trial_start(self, trial) -> None:
        from studies.trainable import cell_tags, split_config

        cfg, settings = split_config(trial.config)
        # The trial's own seed, source site, selection and (grid cells) arm and cell label replace the
        # study's tags of the same name.
        tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id, "config_hash": cfg.hash(),
                **cell_tags(cfg, settings)}
        self.pending.submit({"kind": "start", "trial_id": trial.trial_id, "run_name": str(trial), "tags": tags,
                             "params": {k: str(v)[:6000] for k, v in trial.config.items()},
                             "dataset": self._dataset(cfg)})

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("timesteps_total") or result.get("training_iteration") or iteration)
        metrics = numeric_metrics(_flatten(result))
        self.pending.submit({"kind": "metrics", "trial_id": trial.trial_id, "step": step, "metrics": metrics,
                             "time_ms": int(time.time() * 1000)})

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self.pending.submit({"kind": "end", "trial_id": trial.trial_id, "status": "FAILED" if failed else "FINISHED"})

    def on_experiment_end(self, trials, **info) -> None:
        self.pending.drain(self.drain_s)

    # -- performing a write ----------------------------------------------------------------------
    @property
    def client(self):
        import mlflow

        if self._client is None:
            self._client = mlflow.MlflowClient(self.tracking_uri)
        return self._client

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Dataset

        run_id = self._run_id(op)
        if op["kind"] == "start":
            log_params(self.client, run_id, op["params"])
            if op.get("dataset"):
                self.client.log_inputs(run_id, datasets=[training_input(Dataset.from_dictionary(op["dataset"]))])
        elif op["kind"] == "metrics":
            log_metrics(self.client, run_id, op["metrics"], op["step"], timestamp_ms=op["time_ms"])
        elif op["kind"] == "end":
            self.client.set_terminated(run_id, op["status"])

    def _run_id(self, op: dict[str, Any]) -> str:
        """The trial's run: known, found under the parent (a resumed study), or created by its start."""
        from mlflow.exceptions import MlflowException

        trial_id = op["trial_id"]
        if trial_id not in self._runs:
            found = trial_runs(self.tracking_uri, self.parent_run_id).get(trial_id)
            if found is None and op["kind"] == "start":
                experiment = self.client.get_run(self.parent_run_id).info.experiment_id
                found = self.client.create_run(experiment, run_name=op["run_name"], tags=op["tags"]).info.run_id
            if found is None:
                raise MlflowException(f"no MLflow run of trial {trial_id} under {self.parent_run_id}",
                                      error_code="RESOURCE_DOES_NOT_EXIST")
            self._runs[trial_id] = found
        return self._runs[trial_id]

    def _dataset(self, cfg) -> dict[str, Any] | None:
        """The trial's dataset input as a dict (one per data root and config), or None when the driver
        cannot read the root."""
        key = cfg.data.root, cfg.hash()
        if key not in self._datasets:
            try:
                self._datasets[key] = dataset_input(cfg).dataset.to_dictionary()
            except (OSError, ValueError) as exc:  # ConfigError is a ValueError: a root the driver cannot read
                self._datasets[key] = None
                print(f"[study] no MLflow dataset input for {cfg.data.root}: {exc}", flush=True)
        return self._datasets[key]


def result_loggers() -> list:
    """Tune's JSON and CSV result loggers (``result.json``, ``progress.csv`` in every trial folder)
    without its TensorBoard logger, which prints "NaN or Inf found in input tensor." for every NaN
    in a result (epochs without validation report NaN): MLflow is the study's dashboard. Sets
    ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` so that Tune adds none of its own."""
    import os

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [JsonLoggerCallback(), CSVLoggerCallback()]


def _flatten(result: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def log_trial_outcome(tracking_uri: str, run_id: str, metrics: dict[str, float], artifacts: Path | None,
                      step: int, tags: dict[str, str] | None = None) -> None:
    """What the driver adds to a trial's run after the study (metrics, artifacts, tags)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if metrics:
        log_metrics(client, run_id, metrics, step)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    if artifacts is not None and Path(artifacts).is_dir():
        client.log_artifacts(run_id, str(artifacts), artifact_path="trial")


def log_study_summary(tracking_uri: str, parent_run_id: str, rows: list[dict[str, Any]],
                      best: dict[str, Any] | None, study_dir: Path, files: list[Path] = ()) -> None:
    """Parent run: best (or exported) trial (tag, parameters, metrics), the table of all trials,
    and ``files`` (Pareto front, importance table and plots) under ``search/``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    table_path = study_dir / "trials.csv"
    if table_path.is_file():
        client.log_artifact(parent_run_id, str(table_path))
    for path in files:
        if Path(path).is_file():
            client.log_artifact(parent_run_id, str(path), artifact_path="search")
    with mlflow.start_run(run_id=parent_run_id):
        columns = sorted({k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))})
        mlflow.log_table({c: [_cell(r.get(c)) for r in rows] for c in columns}, artifact_file="trials_table.json")
    if best is None:
        return
    client.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
    if best.get("run_id"):
        client.set_tag(parent_run_id, "best_trial_run_id", best["run_id"])
    log_params(client, parent_run_id, {f"best.{k}": v for k, v in best.get("params", {}).items()})
    log_metrics(client, parent_run_id, {f"best/{k}": v for k, v in best.get("metrics", {}).items()})


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
