"""Where a trial's time goes: training steps, validation, checkpointing, start-up, cross-site evaluation.

A trial (``studies/trainable.py:train_func``) stamps four moments on the trial's side and reads the
rest from the engine's epoch history (``dualssl.engine.fit.Trainer.run`` records ``epoch_start_unix``,
``train_time_s``, ``val_time_s`` and ``callback_time_s`` for every epoch)::

    started ── startup ──┬─ epoch 0: train │ validation │ checkpoint ─┬─ epoch 1 ... ─┬─ tail ── fit_done
                         first epoch_start_unix                                         last epoch's end
    fit_done ── cross-site evaluation ── eval_done ── (artifacts) ── ended

* ``startup``: Ray Train's controller and worker group, process start, data (cache) and model set-up;
  with the moment rank 0 entered the train loop it splits into ``startup_workers`` (controller,
  placement group, worker processes, their process group and the import of the train loop) and
  ``startup_setup`` (data, model, DDP wrap, up to the first step), reported as ``time/<part>_s``
  beside the phases (not one of them);
* ``checkpoint``: the epoch callbacks (checkpoint written, ``ray.train.report``), plus the tail after
  the last epoch (its checkpoint, the worker group's shutdown): a checkpoint holds every epoch's
  ``callback_time_s`` but its own;
* ``other``: the rest (a restarted worker group, waiting for resources, writing artifacts).

Only epochs that this run of the trial function trained count (a trial that Tune restarted resumes
with the earlier epochs in its history). The numbers go to the trial's final result (and MLflow)
as ``time/<phase>_s`` and ``time/<phase>_frac``; ``benchmarks/study_throughput.py`` sums them over a
study.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

PHASES: tuple[str, ...] = ("startup", "train", "validation", "checkpoint", "crosssite", "other")
"""The parts of a trial's wall time, in the order they happen."""


def _own_epochs(history: Iterable[Mapping[str, Any]], started: float) -> list[Mapping[str, Any]]:
    return [h for h in history if float(h.get("epoch_start_unix", -math.inf)) >= started]


def startup_split(started: float, loop_started: float | None, first_epoch: float) -> dict[str, float]:
    """The start-up from ``started`` to the first epoch, split at the train loop's entry into
    ``time/startup_workers_s`` and ``time/startup_setup_s``; nothing when the loop's stamp is missing
    or falls outside it (a stale stamp)."""
    if loop_started is None or not started <= loop_started <= first_epoch:
        return {}
    return {"time/startup_workers_s": float(loop_started - started),
            "time/startup_setup_s": float(first_epoch - loop_started)}


def time_breakdown(history: Iterable[Mapping[str, Any]], started: float, fit_done: float,
                   eval_done: float, ended: float, loop_started: float | None = None) -> dict[str, float]:
    """``time/<phase>_s`` and ``time/<phase>_frac`` for :data:`PHASES`, ``time/trial_s``,
    ``time/steps`` and ``time/steps_per_s`` (training steps per second of step time), and the
    start-up's two parts ``time/startup_workers_s`` and ``time/startup_setup_s`` when
    ``loop_started`` falls inside it.

    Args:
        history: the engine's per-epoch metrics (from the trial's last checkpoint).
        started, fit_done, eval_done, ended: ``time.time()`` at the trial function's start, after
            ``TorchTrainer.fit()``, after the cross-site evaluation, and before the final report.
        loop_started: ``time.time()`` when rank 0 of the last worker group entered the train loop.
    """
    own = _own_epochs(history, started)
    train = sum(float(h.get("train_time_s", 0.0)) for h in own)
    validation = sum(float(h.get("val_time_s", 0.0)) for h in own)
    steps = sum(float(h.get("steps", 0.0)) for h in own)
    if own:
        startup = float(own[0]["epoch_start_unix"]) - started
        last = own[-1]
        last_end = float(last["epoch_start_unix"]) + float(last.get("train_time_s", 0.0)) + float(
            last.get("val_time_s", 0.0))
        checkpoint = sum(float(h.get("callback_time_s", 0.0)) for h in own[:-1]) + max(0.0, fit_done - last_end)
    else:  # nothing trained in this run (it resumed a finished Train run)
        startup, checkpoint = fit_done - started, 0.0
    parts = {"startup": startup, "train": train, "validation": validation, "checkpoint": checkpoint,
             "crosssite": eval_done - fit_done}
    total = ended - started
    parts["other"] = max(0.0, total - sum(parts.values()))
    out = {f"time/{k}_s": float(v) for k, v in parts.items()}
    out.update({f"time/{k}_frac": (float(v) / total if total > 0 else math.nan) for k, v in parts.items()})
    out["time/trial_s"] = float(total)
    out["time/steps"] = steps
    out["time/steps_per_s"] = steps / train if train > 0 else math.nan
    if own:
        out.update(startup_split(started, loop_started, float(own[0]["epoch_start_unix"])))
    return out


def epoch_breakdown(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Approximate ``time/<phase>_s`` of a trial that ended without its final result (stopped by
    ASHA), from its per-epoch Tune results: ``train`` and ``validation`` from the epochs, everything
    else as ``other``. ``startup`` is exact, and split at the train loop's entry into
    ``time/startup_workers_s`` and ``time/startup_setup_s``, when the epochs carry the trial
    function's start (``trial_start_unix``, and ``loop_start_unix``; both from
    ``studies/train_loop.py``); otherwise it comes from Tune's clock (``timestamp`` has whole seconds)."""
    rows = [r for r in results if "train_time_s" in r]
    if not rows:
        return {}
    train = sum(float(r["train_time_s"]) for r in rows)
    validation = sum(float(r.get("val_time_s", 0.0)) for r in rows)
    first = rows[0]
    started = float(first["timestamp"]) - float(first["time_total_s"])
    total = float(rows[-1]["time_total_s"])
    split: dict[str, float] = {}
    trial_start = rows[-1].get("trial_start_unix")
    if trial_start is not None:
        # the first epoch of the trial function's last run (a Tune restart runs it again)
        own = next(r for r in rows if r.get("trial_start_unix") == trial_start)
        startup = max(0.0, float(own["epoch_start_unix"]) - float(trial_start))
        split = startup_split(float(trial_start), own.get("loop_start_unix"), float(own["epoch_start_unix"]))
    else:
        startup = max(0.0, float(first["epoch_start_unix"]) - started)
    other = max(0.0, total - train - validation - startup)
    return {"time/startup_s": startup, "time/train_s": train, "time/validation_s": validation,
            "time/checkpoint_s": 0.0, "time/crosssite_s": 0.0, "time/other_s": other, "time/trial_s": total,
            "time/steps": sum(float(r.get("steps", 0.0)) for r in rows), **split}


def study_fractions(trials: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum of every phase over the trials, each as a fraction of the summed trial wall time."""
    trials = list(trials)
    total = sum(t.get("time/trial_s", 0.0) for t in trials)
    out = {f"{k}_s": sum(t.get(f"time/{k}_s", 0.0) for t in trials) for k in PHASES}
    out.update({f"{k}_frac": (out[f"{k}_s"] / total if total > 0 else math.nan) for k in PHASES})
    out["trial_s"] = total
    return out
