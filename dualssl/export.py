"""Model folders: what a trained checkpoint becomes for inference outside the study.

A model folder holds::

    model.safetensors   SegmentationNet weights (backbone.*, seg_head.*), float32
    config.yaml         the whole Config: architecture (model.*) and preprocessing (data.spacing,
                        data.hu_window, data.patch_size) plus the sliding-window settings (eval.*)
    model.ts            TorchScript of SegmentationNet: (B, 1, X, Y, Z) -> logits (B, K, X, Y, Z)
    metadata.json       format, versions, input/output description, training provenance

:func:`load_model` (``dualssl.evaluation.model_folder``, re-exported here) reads a folder or an MLflow
model URI (``models:/dualssl-pancreas@champion``, ``runs:/<id>/model``) and returns
``(SegmentationNet, Config)``; ``dualssl.evaluation`` wraps the pair in its ``Predictor``.
:func:`log_model` logs a folder as an MLflow pyfunc (``dualssl/serving.py`` as models from code: a scan
in, its mask out through the same ``Predictor`` as ``dualssl predict``; the folder as its artifact, the
``dualssl`` code, pinned requirements, a signature and an input example; nothing pickled) and registers
it under an alias with version tags. This module uses engine and evaluation; neither imports it. It
never imports Ray.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from dualssl.config import Config
from dualssl.evaluation.model_folder import (ARTIFACT, CONFIG_FILE, METADATA_FILE, MODEL_FORMAT,  # noqa: F401
                                             TORCHSCRIPT_FILE, WEIGHTS_FILE, load_model, segmentation_net)

REGISTERED_MODEL_NAME = "dualssl-pancreas"
CHAMPION_ALIAS = "champion"
ORACLE_ALIAS = "oracle"
"""Alias of a model chosen by unseen-site scores: reported, never deployed as the champion."""
_segmentation_net = segmentation_net


def _git_revision() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_model(checkpoint: str | Path | dict[str, Any], out_dir: str | Path, *,
                 metadata: dict[str, Any] | None = None, torchscript: bool = True) -> Path:
    """Write a model folder from a dualssl training checkpoint (a path or its state dict).

    Args:
        checkpoint: a file written by ``dualssl.engine.checkpoint.save_checkpoint`` or the dict itself
            (keys ``config`` and ``model`` are used).
        out_dir: folder to create (its files are overwritten).
        metadata: extra provenance stored under ``training`` in ``metadata.json`` (trial id, source
            sites, selection protocol, best metric, ...).
        torchscript: also write ``model.ts`` (``torch.jit.script`` of the SegmentationNet).

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    from dualssl.engine.checkpoint import load_checkpoint

    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    for key in ("config", "model"):
        if key not in state:
            where = checkpoint if not isinstance(checkpoint, dict) else "checkpoint dict"
            raise ValueError(f"{where}: missing key {key!r}; pass a dualssl training checkpoint")
    cfg = Config.from_dict(state["config"]).validate()
    seg = _segmentation_net(cfg, state["model"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in seg.state_dict().items()}
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
    cfg.save(out / CONFIG_FILE)
    if torchscript:
        torch.jit.script(seg).save(str(out / TORCHSCRIPT_FILE))
    meta = {
        "format": MODEL_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": _git_revision(),
        "config_hash": cfg.hash(),
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256((out / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "input": {"shape": ["B", cfg.model.in_channels, "X", "Y", "Z"], "dtype": "float32",
                  "orientation": "RAS", "spacing_mm": list(cfg.data.spacing),
                  "hu_window": list(cfg.data.hu_window), "intensity": "HU window scaled to [0, 1]",
                  "window": list(cfg.data.patch_size), "multiple_of": 8},
        "output": {"shape": ["B", cfg.model.num_classes, "X", "Y", "Z"], "kind": "logits",
                   "labels": {"0": "background", "1": "pancreas"}},
        "files": {"weights": WEIGHTS_FILE, "config": CONFIG_FILE,
                  "torchscript": TORCHSCRIPT_FILE if torchscript else None},
        "training": {"epoch": state.get("epoch"), "best_metric": state.get("best_metric"),
                     "best_epoch": state.get("best_epoch"), **(metadata or {})},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


def model_signature(cfg: Config | None = None):
    """The pyfunc's MLflow signature (``dualssl.serving.model_signature``): scans in, masks out."""
    from dualssl import serving

    return serving.model_signature()


def input_example(cfg: Config) -> dict[str, str]:
    """A request the model answers: ``{"nifti": base64 .nii.gz}`` of a small synthetic scan (a soft-tissue
    block, 40 HU, in air) that covers one window of ``data.patch_size`` at ``data.spacing``."""
    import nibabel as nib
    import numpy as np

    from dualssl import serving

    shape = tuple(int(p) + 8 for p in cfg.data.patch_size)
    scan = np.full(shape, -1000, dtype=np.int16)
    scan[4:-4, 4:-4, 2:-2] = 40
    affine = np.diag([*map(float, cfg.data.spacing), 1.0])
    return {"nifti": serving.encode_nifti(nib.Nifti1Image(scan, affine))}


PYFUNC_REQUIREMENTS = ("torch", "monai", "nibabel", "safetensors", "numpy", "scipy", "pyyaml", "mlflow")
"""What ``dualssl.serving`` and the ``dualssl`` code it carries import when a model is served."""


def pinned_requirements() -> list[str]:
    """``pkg==version`` of the installed packages the pyfunc needs (:data:`PYFUNC_REQUIREMENTS`)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in PYFUNC_REQUIREMENTS]


def _package_code(dst: Path) -> Path:
    """A clean copy of the ``dualssl`` package (sources only) to log as the pyfunc's code."""
    import shutil

    src = Path(__file__).resolve().parent
    return Path(shutil.copytree(src, dst / "dualssl", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")))


def log_model(model_dir: str | Path, *, registered_name: str | None = REGISTERED_MODEL_NAME,
              alias: str | None = CHAMPION_ALIAS, name: str = "model",
              tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log a model folder to the active MLflow run as a pyfunc and (optionally) register it under an alias.

    The pyfunc is ``dualssl/serving.py`` logged as models from code, with the folder as its artifact
    (``artifacts/model_folder/``: safetensors, config, TorchScript, metadata) and this ``dualssl``
    package as its code (``code/dualssl``): loading it unpickles nothing, and it runs the code of
    ``dualssl predict``. It carries a signature and an input example (:func:`input_example`, checked
    by MLflow by running the model on it). ``tags`` go on the registered version (strings).
    Call inside ``mlflow.start_run()``. Returns ``{"model_uri", "registered_uri", "version"}``
    (the last two None when ``registered_name`` is None).
    """
    import tempfile

    import mlflow

    from dualssl import serving

    if mlflow.active_run() is None:
        raise RuntimeError("dualssl.export.log_model: no active MLflow run; call it inside mlflow.start_run()")
    _, cfg = load_model(model_dir)  # refuses an incomplete or inconsistent folder before logging it
    with tempfile.TemporaryDirectory(prefix="dualssl-code-") as tmp, warnings.catch_warnings():
        # The signature is given: MLflow's advice to add type hints does not apply.
        warnings.filterwarnings("ignore", message=".*type hints", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=serving.__file__, artifacts={serving.ARTIFACT: str(Path(model_dir))},
            code_paths=[str(_package_code(Path(tmp)))], signature=model_signature(cfg),
            input_example=input_example(cfg), pip_requirements=pinned_requirements(),
            registered_model_name=registered_name, await_registration_for=60)
    result: dict[str, Any] = {"model_uri": info.model_uri, "registered_uri": None, "version": None}
    if registered_name:
        client = mlflow.MlflowClient()
        version = info.registered_model_version
        if version is None:  # older servers: look the version up by the model's source
            version = max(int(v.version) for v in client.search_model_versions(f"name='{registered_name}'"))
        result["version"] = int(version)
        result["registered_uri"] = f"models:/{registered_name}/{version}"
        for key, value in (tags or {}).items():
            client.set_model_version_tag(registered_name, str(version), key, str(value))
        if alias:
            client.set_registered_model_alias(registered_name, alias, str(version))
            result["registered_uri"] = f"models:/{registered_name}@{alias}"
    return result
