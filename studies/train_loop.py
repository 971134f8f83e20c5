"""The per-worker training loop of Ray Train: ``dualssl.engine.fit`` under DDP.

Every worker runs :func:`train_loop_per_worker`. The engine stays Ray-free; this module only
overrides two of its steps and adds one callback:

* ``RayTrainer.wrap_model`` -> ``ray.train.torch.prepare_model`` (DDP with :func:`ddp_options`; NCCL on
  CUDA, gloo on CPU, chosen by ``TorchConfig`` in ``trainable.py``);
* ``RayTrainer.wrap_loader`` -> ``dualssl.data.loaders.shard_loader`` (a DistributedSampler seeded
  with ``optim.seed``);
* ``RayReport.on_epoch_end`` -> ``ray.train.report`` on every rank (it is a barrier), with the
  checkpoint attached by rank 0 only.

A restarted worker group (``FailureConfig``) resumes from ``ray.train.get_checkpoint()``: the
engine's checkpoint restores model, optimizer, scheduler, scaler, RNG states and history.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from dualssl.config import Config
from dualssl.engine import Callback, Trainer, fit, load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"
SCORE_KEY = "ckpt_score"
"""Checkpoint score: the selection metric where it was measured this epoch, else -1 (never best).
Ties go to the earlier epoch, as in the engine (a strict ``>`` keeps the first best)."""
ASHA_KEY = "asha_score"
"""What ASHA cuts on: the selection metric (whole-volume Dice on the validation cases) at epochs
where it was measured, NaN at the others and at the last epoch (a trial that trained to the end
is never cut). Tune requires the key in every result; ``studies.tune.MeasuredASHA`` skips the NaNs
(Ray's ASHA would record a NaN at the rung, which exempts the trial from that rung's cut)."""
LOOP_START_KEY = "loop_start_unix"
"""``time.time()`` when rank 0 entered the train loop: splits a trial's start-up (studies/throughput.py)."""
TRIAL_START_KEY = "trial_start_unix"
"""``time.time()`` when the trial function started (``studies/trainable.py``), in every epoch's result: the
start-up of a trial that ASHA stops (it never sends its final result) is then exact too."""


class RayTrainer(Trainer):
    """The engine's Trainer with DDP model and loader wrapping from Ray Train."""

    progress = False  # Ray's own reporting replaces the tqdm bar

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(self.cfg))

    def wrap_loader(self, loader):
        # Not prepare_data_loader: its DistributedSampler is seeded 0 whatever optim.seed says, and its
        # device-moving wrapper would hide the sampler and dataset the engine reseeds every epoch.
        if self.world_size == 1:
            return loader
        from dualssl.data.loaders import shard_loader  # MONAI: imported where data is loaded (dualssl.evaluation)

        return shard_loader(loader, self.rank, self.world_size, self.cfg.optim.seed)


def ddp_options(cfg: Config) -> dict[str, bool]:
    """DistributedDataParallel options for the engine's step.

    With restoration on, a step runs two forwards (clean patch, corrupted crop) before one backward,
    so parameters are used twice: DDP needs ``static_graph`` (the same two forwards every step; it
    also finds the parameters a forward leaves unused). Otherwise one forward; a switched-off
    contrastive branch leaves the projection head without gradients (``find_unused_parameters``).
    """
    if cfg.loss.restoration_on:
        return {"static_graph": True}
    return {"find_unused_parameters": not cfg.loss.contrastive_on}


class RayReport(Callback):
    """Report every epoch's metrics to Ray Train; rank 0 attaches the engine's checkpoint."""

    def __init__(self, resumed_from_epoch: int = 0, fail_at_epoch: int | None = None,
                 fail_marker: str | None = None, loop_started: float | None = None,
                 trial_started: float | None = None):
        self.resumed_from_epoch = resumed_from_epoch
        self.loop_started, self.trial_started = loop_started, trial_started
        self.fail_at_epoch = fail_at_epoch
        self.fail_marker = fail_marker

    def metrics(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        selection = trainer.cfg.eval.selection_metric
        out: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
        out["epoch"] = epoch
        out["epochs_done"] = epoch + 1
        out["timesteps_total"] = epoch + 1  # MLflow's step for this row (MLflowLoggerCallback reads it)
        last = epoch == trainer.cfg.optim.epochs - 1
        measured = bool(metrics.get("val_measured", (epoch + 1) % trainer.cfg.eval.val_every == 0 or last))
        value = float(metrics.get(selection, math.nan))
        measured = measured and math.isfinite(value)
        out[SCORE_KEY] = value - 1e-9 * epoch if measured else -1.0
        out[ASHA_KEY] = value if measured and not last else math.nan
        best = trainer.best_metric
        out["objective"] = best if math.isfinite(best) else 0.0
        out["best_epoch"] = trainer.best_epoch
        out["resumed_from_epoch"] = self.resumed_from_epoch
        out["world_size"] = trainer.world_size
        if self.loop_started is not None:
            out[LOOP_START_KEY] = self.loop_started
        if self.trial_started is not None:
            out[TRIAL_START_KEY] = self.trial_started
        return out

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        report = self.metrics(trainer, epoch, metrics)
        if trainer.is_main_process:
            with tempfile.TemporaryDirectory(prefix="dualssl-ckpt-") as tmp:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, state_fn())
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            ray.train.report(report)
        self._maybe_fail(trainer, epoch)

    def _maybe_fail(self, trainer: Trainer, epoch: int) -> None:
        """Fault injection for tests: kill this worker process once, after ``fail_at_epoch``."""
        if self.fail_at_epoch is None or epoch != self.fail_at_epoch or trainer.rank != trainer.world_size - 1:
            return
        marker = Path(self.fail_marker or "")
        if not self.fail_marker or marker.exists():
            return
        # Die only once the controller holds this epoch's checkpoint: the failure under test is a
        # worker lost between checkpoints, not a report lost in flight.
        ray.train.get_all_reported_checkpoints()
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:  # claimed atomically: a marker shared by the trials of a study kills one worker only
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"killed after epoch {epoch}: {ray.train.get_context().get_experiment_name()}\n".encode())
        os.close(fd)
        os._exit(1)  # a hard death, as a preempted node or OOM-killed process would die


def restore_state() -> dict[str, Any] | None:
    """The engine checkpoint of ``ray.train.get_checkpoint()`` (the latest reported), if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` = {"cfg": Config.to_dict(), "threads", "fail_at_epoch", "fail_marker",
    "trial_started"}."""
    # 1. Unpack the config.
    loop_started = time.time()
    cfg = Config.from_dict(config["cfg"]).validate()
    threads = int(config.get("threads", 0))
    fail_at_epoch = config.get("fail_at_epoch")
    fail_marker = config.get("fail_marker")
    trial_started = config.get("trial_started")

    # 2. One process per reserved CPU: keep torch's intra-op threads to this worker's share.
    if threads > 0:
        torch.set_num_threads(threads)

    # 3. Resume from the latest checkpoint when Ray Train restarts this worker group.
    state = restore_state()
    resumed = int(state["epoch"]) if state else 0

    # 4. Train: the engine's loop, DDP-wrapped, reporting every epoch.
    report = RayReport(resumed, fail_at_epoch, fail_marker, loop_started, trial_started)
    fit(cfg, callbacks=[report], resume_from=state, trainer_cls=RayTrainer,
        device=ray.train.torch.get_device())
