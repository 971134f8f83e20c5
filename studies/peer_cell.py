"""A cell of a peer arm (nnU-Net) inside Ray: the peer's own pipeline in the cell's resources.

``studies/trainable.py`` hands a trial whose ``study.peer`` is set (``dualssl.recipes.PEER_ARMS``) to
:func:`run_peer_cell`, which runs :func:`peer_cell_task` as one Ray task holding what the cell's Ray Train
workers would hold together (``workers x cpus_per_worker`` CPUs, one worker's GPU: nnU-Net trains on
one device), outside the trial's own (empty) reservation as ``crosssite.evaluate_async`` does. The task
plans, preprocesses and trains with nnU-Net (``dualssl.peers.nnunet``) in the study's storage
(``<train_storage>/peer_<cell>/nnUNet_{raw,preprocessed,results}``), predicts the cell's source
validation and unseen cases with ``nnUNetPredictor`` and scores them with the same
``crosssite.evaluate_predictor`` as our own arms, so its rows in ``cases.csv`` are like theirs.

A retried cell keeps nnU-Net's finished preprocessing and ``checkpoint_final.pth`` (no retraining);
``--resume`` reruns no finished cell at all (Tune restores it as finished).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from dualssl.config import Config


def plan_for(peer_plan: str, gpus: float) -> str:
    """'auto' -> 'capped' without a GPU (CPU recipes), 'full' with one; else the given plan."""
    if peer_plan == "auto":
        return "full" if gpus > 0 else "capped"
    if peer_plan not in ("capped", "full"):
        raise ValueError(f"study.peer_plan {peer_plan!r}: 'auto', 'capped' or 'full'")
    return peer_plan


def peer_work_dir(train_storage: str, cell: str) -> Path:
    """Where a cell's nnU-Net folders live: the study's storage (a local temp folder for URI storage,
    which nnU-Net cannot write to)."""
    if "://" in train_storage or not train_storage:
        return Path(tempfile.gettempdir()) / "dualssl-peers" / cell
    return Path(train_storage) / f"peer_{cell}"


def peer_cell_task(cfg_dict: dict[str, Any], peer: str, plan: str, work: str, cpus: float,
                   gpus: float) -> dict[str, Any]:
    """Train and evaluate one peer cell (runs in a Ray task; also callable directly, without Ray)."""
    import multiprocessing

    # nnU-Net forks pools with the default start method in places (its file listing): a fork of a Ray
    # worker, which runs threads, hung on a lock copied mid-acquire (seen in the fingerprint step).
    # Spawned children re-import the main module; a Ray worker's (default_worker.py) only builds a parser.
    multiprocessing.set_start_method("spawn", force=True)
    from dualssl.peers.nnunet import NnunetPredictor, run_cell, settings_for
    from studies.crosssite import evaluate_predictor

    cfg = Config.from_dict(cfg_dict)
    settings = settings_for(cfg, peer, plan=plan, device="cuda" if gpus > 0 else "cpu", cpus=max(1, int(cpus)))
    run = run_cell(cfg, settings, Path(work))
    start = time.perf_counter()
    predictor = NnunetPredictor(run.fold_folder, device=settings.device, mirroring=settings.mirroring)
    info = run.info()
    meta = {"system": f"nnU-Net {info['nnunet_version']} ({peer})", "plan": info["plan_label"],
            "nnunet_patch_size": run.patch_size, "nnunet_features": run.features_per_stage,
            "nnunet_batch_size": run.batch_size, "iterations": settings.iterations,
            "mirroring": settings.mirroring}
    outcome = evaluate_predictor(predictor, cfg, meta)
    seconds = {**run.seconds, "crosssite_s": time.perf_counter() - start}
    files = dict(outcome["files"])
    files["nnunet_plans.json"] = run.plans_file.read_bytes()
    files["nnunet_splits_final.json"] = run.split_file.read_bytes()
    for log in sorted(run.fold_folder.glob("training_log_*.txt")):
        files[f"nnunet_{log.name}"] = log.read_bytes()
    if (run.fold_folder / "progress.png").is_file():
        files["nnunet_progress.png"] = (run.fold_folder / "progress.png").read_bytes()
    files["nnunet_cell.json"] = json.dumps({**info, "seconds": seconds}, indent=1, default=str).encode()
    return {"summary": outcome["summary"], "files": files, "info": {**info, "work_dir": work},
            "seconds": seconds, "epochs": settings.epochs}


def run_peer_cell(cfg: Config, settings: Any, trial_id: str) -> dict[str, Any]:
    """:func:`peer_cell_task` as a Ray task with the cell's CPU/GPU request, waited for.

    ``settings`` is the trial's ``studies.trainable.TrialSettings``.
    """
    cpus = settings.cpus_per_worker * settings.workers
    gpus = settings.gpus_per_worker
    plan = plan_for(settings.peer_plan, gpus)
    work = peer_work_dir(settings.train_storage, settings.cell or f"trial_{trial_id}")
    # nnU-Net's augmentation workers are the cell's CPUs (nnUNet_n_proc_DA, set inside the task)
    task = ray.remote(peer_cell_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1,
                                              scheduling_strategy="DEFAULT")
    os.makedirs(work, exist_ok=True)
    return ray.get(task.remote(cfg.to_dict(), settings.peer, plan, str(work), cpus, gpus))
