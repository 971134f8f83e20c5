"""Glue between files, checkpoints and the predictor: evaluate cases per site, segment scans.

Metrics are computed in each case's ORIGINAL geometry: the prediction is brought back onto the input
scan's grid (``Predictor.predict_file``) and compared with the original label file at the label's own
voxel spacing, so every model is scored on the same grid whatever spacing it works at.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from dualssl.config import Config
from dualssl.evaluation.inference import Predictor
from dualssl.evaluation.metrics import FAILURE_DICE, NSD_TOLERANCE_MM, case_metrics, penalised_distances, summarise
from dualssl.evaluation.report import write_per_case_csv, write_summary_json

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


class CaseLike(Protocol):
    """What evaluation reads of ``dualssl.data.datalist.Case``."""

    case_id: str
    image: Any
    label: Any
    site: str


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _load_label(case: CaseLike, pred: nib.Nifti1Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Original label as bool (X,Y,Z) (every non-zero label = pancreas) and its spacing in mm."""
    if not case.label:
        raise ValueError(f"case {case.case_id}: no label file; evaluation needs labelled cases")
    path = Path(case.label)
    if not path.is_file():
        raise FileNotFoundError(f"case {case.case_id}: label {path} not found")
    ref = nib.load(path)
    label = np.asanyarray(ref.dataobj)
    if label.ndim > 3 and all(s == 1 for s in label.shape[3:]):
        label = label.reshape(label.shape[:3])
    if label.shape != pred.shape:
        raise ValueError(f"case {case.case_id}: label {path} has shape {label.shape} but image {case.image} "
                         f"has {pred.shape}; fix the dataset (dualssl verify-dataset lists such problems)")
    if not np.allclose(ref.affine, pred.affine, atol=1e-3):
        raise ValueError(f"case {case.case_id}: label {path} and image {case.image} have different affines; "
                         f"resample the label onto the image grid (dualssl verify-dataset)")
    spacing = tuple(float(s) for s in nib.affines.voxel_sizes(ref.affine))
    return label != 0, spacing  # type: ignore[return-value]


def _cache_hits(predictor: Any) -> int | None:
    """Cases the predictor's preprocessing has read from the study's cache so far (None: it never does)."""
    hits = getattr(getattr(predictor, "preprocess", None), "hits", None)
    return hits if isinstance(hits, int) else None


def evaluate_cases(predictor: Predictor, cases: Sequence[CaseLike], cfg: Config, out_dir: str | Path,
                   source_sites: Sequence[str], *, save_predictions: bool = False,
                   meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Predict every case, score it against its original label, write ``per_case.csv`` and ``summary.json``.

    Args:
        predictor: a ``Predictor`` (its ``predict_file`` runs the data layer's preprocessing).
        cases: labelled cases (``case_id``, ``image``, ``label``, ``site``).
        cfg: the run's config (recorded in the summary's settings).
        out_dir: folder for ``per_case.csv``, ``summary.json`` and, when asked, ``predictions/``.
        source_sites: training sites (every other site counts as unseen in ``across_sites``).
        save_predictions: also write each mask to ``out_dir/predictions/<case_id>.nii.gz``.
        meta: extra plain values stored under ``summary["settings"]``.

    Returns:
        ``summarise(rows, source_sites)`` plus ``settings``. ``per_case.csv`` holds one row per case:
        ``case_id, site, dice, jaccard, nsd, hd95, asd`` (the names ``summarise`` aggregates into
        ``<name>_mean``), then ``role`` (source/unseen), volumes, the empty-mask flags, spacing, time.
    """
    if not cases:
        raise ValueError("evaluate_cases: no cases to evaluate (check the dataset root and the site names)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    sources = set(source_sites)
    hits_before = _cache_hits(predictor)
    for case in tqdm(cases, desc="evaluate", unit="case"):
        start = time.perf_counter()
        pred_img = predictor.predict_file(case.image)
        pred = np.asanyarray(pred_img.dataobj) != 0
        label, spacing = _load_label(case, pred_img)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        if save_predictions:
            (out_dir / "predictions").mkdir(exist_ok=True)
            nib.save(pred_img, out_dir / "predictions" / f"{case.case_id}.nii.gz")
        scores = case_metrics(pred, label, spacing)
        rows.append({"case_id": case.case_id, "site": case.site, **scores,
                     **penalised_distances(scores, label.shape, spacing),
                     "role": "source" if case.site in sources else "unseen",
                     "pred_ml": float(pred.sum()) * voxel_ml, "label_ml": float(label.sum()) * voxel_ml,
                     "empty_pred": not pred.any(), "empty_label": not label.any(),
                     "spacing_mm": "x".join(f"{s:.4g}" for s in spacing),
                     "seconds": round(time.perf_counter() - start, 3)})

    summary = summarise(rows, source_sites)
    summary["settings"] = {
        "metrics_geometry": "original input grid and label spacing",
        "empty_mask_policy": "both empty: dice 1, nsd 1, hd95/asd 0; one empty: dice 0, nsd 0, hd95/asd NaN "
                             "(left out of hd95/asd means; counted in n_missed or n_spurious); hd95_penalised/asd_penalised "
                             "count such a case as the diagonal of its image extent in mm",
        "std": "sample (ddof=1); NaN (null) with fewer than two values",
        "nsd_tolerance_mm": NSD_TOLERANCE_MM, "failure_dice": FAILURE_DICE,
        "tta_flips": cfg.eval.tta_flips, "tta_combinations": 8 if cfg.eval.tta_flips else 1,
        "keep_largest": cfg.eval.keep_largest, "sw_overlap": cfg.eval.sw_overlap,
        "patch_size": list(cfg.data.patch_size), "spacing": list(cfg.data.spacing),
        "source_sites": list(source_sites), "config_hash": cfg.hash(), **dict(meta or {}),
    }
    if hits_before is not None:  # a study's evaluation (dualssl.data.cache.CachedInference)
        summary["settings"]["preprocessed_from_cache"] = _cache_hits(predictor) - hits_before
    write_per_case_csv(rows, out_dir / "per_case.csv")
    write_summary_json(summary, out_dir / "summary.json")
    return summary


def load_checkpoint_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Config]:
    """Engine checkpoint (``{"config": Config.to_dict(), "model": DualSSLNet state_dict, ...}``) ->
    (``SegmentationNet`` on the CPU, its ``Config``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in ("config", "model") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a dualssl training checkpoint (missing {missing}); "
                         f"use checkpoint_best.pt or checkpoint_latest.pt of a run folder")
    from dualssl.models import SegmentationNet
    from dualssl.models.factory import build_model

    cfg = Config.from_dict(state["config"]).validate()
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    return SegmentationNet(net), cfg


def evaluate_held_out(model: torch.nn.Module, cfg: Config, data_root: str | Path, sites: Sequence[str] | None,
                      out_dir: str | Path, tta: bool | None = None,
                      meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (with its training ``cfg``) on held-out cases of ``sites`` (default: every
    non-source site) of the dataset at ``data_root``.

    The dataset is split exactly as in training (``data.source_sites``, ``val_fraction``,
    ``split_seed`` of ``cfg``): a source site contributes its validation cases only, never its training
    cases; any other site contributes all its cases. ``tta`` None keeps ``cfg.eval.tta_flips`` (what the
    study evaluated with). Writes ``per_case.csv`` and ``summary.json`` (:func:`evaluate_cases`).
    """
    from dualssl.data.datalist import load_datalist, split_cases

    cfg.data.root = str(data_root)
    if tta is not None:
        cfg.eval.tta_flips = bool(tta)
    split = split_cases(load_datalist(data_root), cfg.data.source_sites, cfg.data.val_fraction,
                        cfg.data.split_seed)
    held_out: dict[str, list[Any]] = {site: list(cases) for site, cases in split.test.items()}
    for case in split.val:
        held_out.setdefault(case.site, []).append(case)
    sources = set(cfg.data.source_sites)
    if sites is None or len(sites) == 0:
        sites = [s for s in held_out if s not in sources]
    unknown = [s for s in sites if s not in held_out]
    if unknown:
        raise ValueError(f"sites {unknown}: no held-out cases in {data_root}; available: {sorted(held_out)}")
    cases = [case for site in sites for case in held_out[site]]
    return evaluate_cases(Predictor(model, cfg), cases, cfg, out_dir, cfg.data.source_sites,
                          meta={"data_root": str(data_root), "sites": list(sites), **dict(meta or {})})


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, sites: Sequence[str] | None,
                        out_dir: str | Path, tta: bool | None = None) -> dict[str, Any]:
    """:func:`evaluate_held_out` of a training checkpoint (``.pt``)."""
    model, cfg = load_checkpoint_model(checkpoint)
    return evaluate_held_out(model, cfg, data_root, sites, out_dir, tta, meta={"checkpoint": str(checkpoint)})


def evaluate_model(source: str | Path, data_root: str | Path, sites: Sequence[str] | None, out_dir: str | Path,
                   tta: bool | None = None) -> dict[str, Any]:
    """:func:`evaluate_held_out` of an exported model: a model folder or an MLflow model URI
    (``models:/NAME@ALIAS``, ``runs:/ID/model``); the folder's config gives the split and the settings."""
    from dualssl.evaluation.model_folder import load_model

    model, cfg = load_model(source)
    return evaluate_held_out(model, cfg, data_root, sites, out_dir, tta, meta={"model": str(source)})


def _expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and _is_nifti(p))
            if not found:
                raise ValueError(f"{item}: folder holds no .nii or .nii.gz files")
            files += found
        elif item.is_file():
            if not _is_nifti(item):
                raise ValueError(f"{item}: not a NIfTI file (.nii or .nii.gz)")
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: input not found")
    return files


def _output_paths(inputs: Sequence[str | Path], files: list[Path], output: Path) -> list[Path]:
    """One input file -> ``output`` is the file (or a folder that exists); otherwise a folder."""
    single = len(inputs) == 1 and len(files) == 1 and Path(inputs[0]).is_file()
    if single and not output.is_dir() and _is_nifti(output):
        targets = [output]
    else:
        if output.exists() and not output.is_dir():
            raise ValueError(f"{output}: several inputs need an output folder, but this is a file")
        targets = [output / f.name for f in files]
    names = [t.resolve() for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"{output}: two inputs share a file name; predict them into separate folders")
    clash = set(names) & {f.resolve() for f in files}
    if clash:
        raise ValueError(f"{sorted(clash)[0]}: the prediction would overwrite its input; choose another output")
    return targets


def predict_paths(model_or_ckpt: Predictor | str | Path, inputs: Sequence[str | Path], output: str | Path,
                  tta: bool | None = None) -> list[Path]:
    """Segment NIfTI files (or folders of them) into uint8 masks in each input's own geometry.

    Args:
        model_or_ckpt: a ``Predictor``, a training checkpoint file (``.pt``), or an exported model
            folder / MLflow model URI (``models:/NAME@ALIAS``, read by ``dualssl.evaluation.model_folder.load_model``).
        inputs: files or folders of ``.nii``/``.nii.gz``.
        output: one input file -> the output file (``.nii``/``.nii.gz``, or an existing folder);
            several inputs -> a folder, one mask per input under the input's file name.
        tta: flip test-time augmentation (8 flips); None (default) keeps the model's ``eval.tta_flips``,
            as the study's evaluation and the MLflow pyfunc do.

    Returns:
        The written paths, in input order.
    """
    if isinstance(model_or_ckpt, Predictor):
        predictor = model_or_ckpt
    elif Path(model_or_ckpt).is_file():
        predictor = Predictor(*load_checkpoint_model(model_or_ckpt))
    elif not Path(model_or_ckpt).is_dir() and ":/" not in str(model_or_ckpt):
        raise FileNotFoundError(f"{model_or_ckpt}: not found; give a training checkpoint (.pt), an exported "
                                f"model folder or an MLflow model URI such as models:/NAME@ALIAS")
    else:  # an exported model folder or an MLflow model URI
        from dualssl.evaluation.model_folder import load_model

        predictor = Predictor(*load_model(model_or_ckpt))
    files = _expand_inputs(inputs)
    targets = _output_paths(inputs, files, Path(output))
    for src, dst in tqdm(list(zip(files, targets)), desc="predict", unit="scan"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        nib.save(predictor.predict_file(src, tta=tta), dst)
    return targets
