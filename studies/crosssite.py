"""A trial's best checkpoint measured on every unseen site.

:func:`evaluate_checkpoint` runs where the trial's workers ran (a Ray task with one worker's CPU
and GPU, see :func:`remote_evaluate`); it returns the site summary of
``dualssl.evaluation.run.evaluate_cases`` plus the files it wrote (per-case CSV, summary.json), so
the caller can log them wherever it likes. :func:`flat_metrics` turns the summary into the flat
metric names that Tune results and MLflow share::

    site/<site>/dice_mean, site/<site>/dice_std, site/<site>/hd95_mean, ... (every unseen site)
    mean_unseen_dice, worst_site_dice, std_across_sites, stability
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from dualssl.config import Config

PER_SITE_KEYS = ("dice_mean", "dice_std", "hd95_mean", "hd95_std", "asd_mean", "asd_std")
ACROSS_KEYS = ("mean_unseen_dice", "worst_site_dice", "std_across_sites", "stability")
# dualssl.evaluation.metrics.summarise names the first two "dice_mean" (mean of site means) and
# "dice_std" (std of site means) inside across_sites; either spelling is read.
_ACROSS_ALIASES = {"mean_unseen_dice": "dice_mean", "std_across_sites": "dice_std"}


def unseen_cases(cfg: Config) -> list:
    """The test cases of every site that is not a source site (the split the engine uses)."""
    from dualssl.data.datalist import load_datalist, split_cases

    split = split_cases(load_datalist(cfg.data.root), cfg.data.source_sites, cfg.data.val_fraction,
                        cfg.data.split_seed)
    return [case for site in sorted(split.test) if site not in cfg.data.source_sites for case in split.test[site]]


def evaluate_checkpoint(checkpoint: ray.train.Checkpoint | str | Path, device: str | None = None,
                        threads: int = 0) -> dict[str, Any]:
    """Evaluate a Ray Train checkpoint (folder with ``checkpoint.pt``) on the unseen sites.

    Returns ``{"summary": evaluate_cases summary, "files": {name: bytes}, "epoch": int}``.
    """
    from dualssl.engine import load_checkpoint
    from dualssl.evaluation.inference import Predictor
    from dualssl.evaluation.run import evaluate_cases
    from dualssl.models import SegmentationNet, build_model
    from studies.train_loop import CHECKPOINT_FILE

    if threads > 0:
        torch.set_num_threads(threads)
    if isinstance(checkpoint, (str, Path)):
        state = load_checkpoint(Path(checkpoint) / CHECKPOINT_FILE)
    else:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    cfg = Config.from_dict(state["config"])
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(SegmentationNet(net).eval(), cfg, device=device)
    with tempfile.TemporaryDirectory(prefix="dualssl-eval-") as tmp:
        summary = evaluate_cases(predictor, unseen_cases(cfg), cfg, tmp, cfg.data.source_sites)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return {"summary": summary, "files": files, "epoch": int(state["epoch"]) - 1}


def remote_evaluate(checkpoint: ray.train.Checkpoint, cpus: float, gpus: float) -> dict[str, Any]:
    """:func:`evaluate_checkpoint` as a Ray task holding one Train worker's resources."""
    # "DEFAULT": outside the trial's placement group, which holds only the trial's own reservation
    task = ray.remote(evaluate_checkpoint).options(num_cpus=cpus, num_gpus=gpus, max_retries=1,
                                                   scheduling_strategy="DEFAULT")
    return ray.get(task.remote(checkpoint, "cuda" if gpus > 0 else "cpu", max(1, int(cpus))))


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Per-site and across-site numbers under flat names (strings such as worst_site are left out)."""
    out: dict[str, float] = {}
    for site, stats in summary.get("per_site", {}).items():
        for key in PER_SITE_KEYS:
            if key in stats:
                out[f"site/{site}/{key}"] = float(stats[key])
        if "n" in stats:
            out[f"site/{site}/n"] = float(stats["n"])
    across = summary.get("across_sites", {})
    for key in ACROSS_KEYS:
        value = across.get(key, across.get(_ACROSS_ALIASES.get(key, key)))
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}
