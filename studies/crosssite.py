"""A trial's best checkpoint measured on the source validation cases and on every unseen site.

:func:`evaluate_checkpoint` runs where the trial's workers ran (a Ray task with one worker's CPU
and GPU, see :func:`remote_evaluate`). Every case goes through the same path
(``dualssl.evaluation.run.evaluate_cases``: prediction back on the original grid, the same metrics),
so the source site's validation Dice sits beside the unseen sites' like for like.

Each unseen site's cases are split once (``dualssl.data.datalist.split_selection_report``, seeded by
``data.split_seed``) into a REPORT part and a SELECTION part, as DomainBed's test-domain oracle does:

* the reported summary (``per_case.csv``, ``summary.json``) holds the source validation cases
  (``source: true``) and the report part of every unseen site; ``across_sites`` is over the unseen
  sites only;
* the oracle summary (``oracle_per_case.csv``, ``oracle_summary.json``, ``summary["oracle"]``) holds
  the selection part only. Only it may be used to rank trials on unseen sites.

:func:`flat_metrics` turns a summary into the flat names that Tune results and MLflow share::

    site/<site>/<key>          for every key in PER_SITE_KEYS (source site and unseen sites)
    <key>                      for every key in ACROSS_KEYS (unseen sites only)
    oracle/site/<site>/<key>   the same from the selection part (unseen sites only)
    oracle/<key>               e.g. oracle/mean_unseen_dice
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import ray
import torch

from dualssl.config import Config
from dualssl.evaluation.metrics import ACROSS_KEYS as _ACROSS, SITE_KEYS, summarise

PER_SITE_KEYS: tuple[str, ...] = ("source", *SITE_KEYS)
"""Per-site numbers under ``site/<site>/<key>`` (``source`` is 1.0 for a source site, else 0.0)."""
ACROSS_KEYS: tuple[str, ...] = _ACROSS
"""``mean_unseen_dice, worst_site_dice, std_across_sites, stability, failure_rate`` (unseen sites only)."""
ORACLE_PREFIX = "oracle/"
"""Prefix of the numbers measured on the selection part of the unseen sites."""


def is_cross_metric(name: str) -> bool:
    """Whether a flat metric name comes from :func:`flat_metrics` (reported or oracle)."""
    name = name.removeprefix(ORACLE_PREFIX)
    return name.startswith("site/") or name in ACROSS_KEYS


def evaluation_parts(cfg: Config) -> dict[str, list]:
    """The cases a trial is evaluated on, split as the engine and the oracle split them.

    Returns ``{"source": source validation cases, "report": report part of every unseen site,
    "selection": selection part of every unseen site}`` (each sorted by site, then case id).
    """
    from dualssl.data.datalist import load_datalist, split_cases, split_selection_report

    split = split_cases(load_datalist(cfg.data.root), cfg.data.source_sites, cfg.data.val_fraction,
                        cfg.data.split_seed)
    unseen = {site: cases for site, cases in split.test.items() if site not in cfg.data.source_sites}
    selection, report = split_selection_report(unseen, cfg.data.split_seed)
    flatten = lambda parts: [case for site in sorted(parts) for case in parts[site]]  # noqa: E731
    return {"source": sorted(split.val, key=lambda c: (c.site, c.case_id)), "report": flatten(report),
            "selection": flatten(selection)}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (0: left as they are), then restored."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_checkpoint(checkpoint: ray.train.Checkpoint | str | Path, device: str | None = None,
                        threads: int = 0) -> dict[str, Any]:
    """Evaluate a Ray Train checkpoint (folder with ``checkpoint.pt``) on source validation and unseen sites.

    Returns ``{"summary": reported summary with summary["oracle"] = the selection part's summary,
    "files": {name: bytes}, "epoch": int}``; the files are ``per_case.csv``, ``summary.json``,
    ``oracle_per_case.csv`` and ``oracle_summary.json`` (the oracle files are absent when no unseen
    site has two or more cases, and then ``summary["oracle"]`` has no sites).
    """
    # torch's thread count is global to the process: a Ray task owns its process, but a caller
    # of this function (a test, a notebook) keeps its own setting afterwards
    with torch_threads(threads):
        return _evaluate_checkpoint(checkpoint, device)


def _evaluate_checkpoint(checkpoint: ray.train.Checkpoint | str | Path, device: str | None) -> dict[str, Any]:
    from dualssl.data.cache import CachedInference
    from dualssl.data.datalist import load_datalist
    from dualssl.engine import load_checkpoint
    from dualssl.evaluation.inference import Predictor
    from dualssl.models import SegmentationNet, build_model
    from studies.train_loop import CHECKPOINT_FILE

    if isinstance(checkpoint, (str, Path)):
        state = load_checkpoint(Path(checkpoint) / CHECKPOINT_FILE)
    else:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    cfg = Config.from_dict(state["config"])
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # each case's preprocessed image from the study's cache (written by its one pass), else from the file
    preprocess = CachedInference(cfg.data, load_datalist(cfg.data.root))
    predictor = Predictor(SegmentationNet(net).eval(), cfg, device=device, preprocess=preprocess)
    return {**evaluate_predictor(predictor, cfg), "epoch": int(state["epoch"]) - 1}


def evaluate_predictor(predictor: Any, cfg: Config, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Any predictor with ``predict_file(path) -> nibabel image`` (input grid) on a cell's evaluation parts.

    Returns ``{"summary", "files"}`` as :func:`evaluate_checkpoint` (which calls it for our own nets;
    ``studies/peer_cell.py`` for a peer system's predictor); ``meta`` goes into both summaries' settings.
    """
    from dualssl.evaluation.run import evaluate_cases

    parts = evaluation_parts(cfg)
    sources = cfg.data.source_sites
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="dualssl-eval-") as tmp:
        summary = evaluate_cases(predictor, parts["source"] + parts["report"], cfg, Path(tmp) / "report",
                                 sources, meta={**(meta or {}), "part": "source validation + unseen report part"})
        files.update({p.name: p.read_bytes() for p in (Path(tmp) / "report").iterdir() if p.is_file()})
        if parts["selection"]:
            oracle = evaluate_cases(predictor, parts["selection"], cfg, Path(tmp) / "oracle", sources,
                                    meta={**(meta or {}), "part": "unseen selection part (oracle)"})
            files.update({f"oracle_{p.name}": p.read_bytes() for p in (Path(tmp) / "oracle").iterdir()
                          if p.is_file()})
        else:
            oracle = summarise([], sources)
    summary["oracle"] = {"per_site": oracle["per_site"], "across_sites": oracle["across_sites"]}
    return {"summary": summary, "files": files}


def evaluate_async(checkpoint: ray.train.Checkpoint, cpus: float, gpus: float) -> ray.ObjectRef:
    """:func:`evaluate_checkpoint` as a Ray task holding one Train worker's resources (its future)."""
    # "DEFAULT": outside the trial's placement group, which holds only the trial's own reservation
    task = ray.remote(evaluate_checkpoint).options(num_cpus=cpus, num_gpus=gpus, max_retries=1,
                                                   scheduling_strategy="DEFAULT")
    return task.remote(checkpoint, "cuda" if gpus > 0 else "cpu", max(1, int(cpus)))


def remote_evaluate(checkpoint: ray.train.Checkpoint, cpus: float, gpus: float) -> dict[str, Any]:
    """:func:`evaluate_async`, waited for."""
    return ray.get(evaluate_async(checkpoint, cpus, gpus))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else math.nan
    return None  # None (no unseen site), strings such as worst_site


def _flat(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for site, stats in summary.get("per_site", {}).items():
        for key in PER_SITE_KEYS:
            value = _number(stats.get(key))
            if value is not None:
                out[f"{prefix}site/{site}/{key}"] = value
    across = summary.get("across_sites", {})
    for key in ACROSS_KEYS:
        value = _number(across.get(key))
        if value is not None:
            out[f"{prefix}{key}"] = value
    return out


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Reported and oracle numbers of :func:`evaluate_checkpoint`'s summary under flat names.

    Undefined numbers (a site's std with one case, HD95 of a site where every case was missed) are NaN;
    across-site numbers are left out when there is no unseen site.
    """
    out = _flat(summary, "")
    if summary.get("oracle"):
        out.update(_flat(summary["oracle"], ORACLE_PREFIX))
    return out
