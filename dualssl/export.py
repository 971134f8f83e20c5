"""Model folders: what a trained checkpoint becomes for inference outside the study.

A model folder holds::

    model.safetensors   SegmentationNet weights (backbone.*, seg_head.*), float32
    config.yaml         the whole Config: architecture (model.*) and preprocessing (data.spacing,
                        data.hu_window, data.patch_size) plus the sliding-window settings (eval.*)
    model.ts            TorchScript of SegmentationNet: (B, 1, X, Y, Z) -> logits (B, K, X, Y, Z)
    metadata.json       format, versions, input/output description, training provenance

:func:`load_model` reads a folder or an MLflow model URI (``models:/dualssl-pancreas@champion``,
``runs:/<id>/model``) and returns ``(SegmentationNet, Config)``; ``dualssl.evaluation`` wraps the
pair in its ``Predictor``. :func:`log_model` logs a folder as an MLflow pyfunc (``dualssl/serving.py``
as models from code, the folder as its artifact, pinned requirements, a signature; nothing pickled)
and registers it under an alias; a registry URI loads through the same safetensors path. This module
never imports Ray.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from dualssl.config import Config

MODEL_FORMAT = "dualssl-model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TORCHSCRIPT_FILE = "model.ts"
METADATA_FILE = "metadata.json"
REGISTERED_MODEL_NAME = "dualssl-pancreas"
CHAMPION_ALIAS = "champion"
ORACLE_ALIAS = "oracle"
"""Alias of a model chosen by unseen-site scores: reported, never deployed as the champion."""
_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


def _segmentation_net(cfg: Config, model_state: dict[str, torch.Tensor] | None = None):
    """Build ``SegmentationNet`` for ``cfg.model``; ``model_state`` is a DualSSLNet state dict."""
    from dualssl.models import SegmentationNet, build_model

    net = build_model(cfg.model)
    if model_state is not None:
        net.load_state_dict(model_state)
    return SegmentationNet(net).eval()


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


def _is_uri(source: str) -> bool:
    return any(str(source).startswith(s) for s in _URI_SCHEMES)


def _pyfunc_artifact(model_dir: Path) -> Path:
    """The model folder inside a downloaded pyfunc (``MLmodel`` names it), or ``model_dir`` itself."""
    import yaml

    from dualssl.serving import ARTIFACT

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return model_dir
    pyfunc = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    path = ((pyfunc.get("artifacts") or {}).get(ARTIFACT) or {}).get("path")
    return model_dir / path if path else model_dir


def _resolve_folder(source: str | Path, download_dir: str | Path | None = None) -> Path:
    """A local model folder for ``source`` (downloading an MLflow model URI when needed)."""
    if not _is_uri(str(source)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: model folder not found; give a folder written by "
                                    "dualssl.export.export_model or an MLflow URI such as "
                                    f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION_ALIAS}")
        return folder
    import mlflow

    dst = Path(download_dir) if download_dir else Path(tempfile.mkdtemp(prefix="dualssl-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(source), dst_path=str(dst)))
    # pyfunc models name the folder among their artifacts; models logged before carried it as extra_files
    for candidate in (_pyfunc_artifact(local), local / "extra_files", local):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{source}: the MLflow model has no {WEIGHTS_FILE}; log it with "
                            "dualssl.export.log_model so that the model folder travels with it")


def load_model(source: str | Path, device: str | torch.device | None = None, *,
               download_dir: str | Path | None = None):
    """Load ``(SegmentationNet, Config)`` from a model folder or an MLflow model URI.

    Args:
        source: a folder written by :func:`export_model`, or ``models:/NAME@ALIAS``,
            ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``.
        device: where to put the network (default CPU); it is returned in eval mode.
        download_dir: where an MLflow URI is downloaded (default: a new temp dir).

    Returns:
        ``(model, cfg)``: ``model(x (B, 1, X, Y, Z)) -> logits (B, K, X, Y, Z)``.
    """
    from safetensors.torch import load_file

    try:
        folder = _resolve_folder(source, download_dir)
    except Exception as exc:  # MlflowException: a registered model, version or alias that is not there
        if type(exc).__name__ != "MlflowException":
            raise
        import mlflow

        raise FileNotFoundError(
            f"{source}: not found in the MLflow store {mlflow.get_registry_uri()} (tracking URI "
            f"{mlflow.get_tracking_uri()}): {str(exc).splitlines()[0][:300]}; pass the store the study "
            "registered it in with --tracking-uri (or MLFLOW_TRACKING_URI), e.g. "
            "sqlite:////abs/path/study/mlflow.db, or give an exported model folder") from exc
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; {folder} is not a complete dualssl model "
                                    "folder (re-export it with dualssl.export.export_model)")
    cfg = Config.load(folder / CONFIG_FILE).validate()
    model = _segmentation_net(cfg)
    weights = load_file(str(folder / WEIGHTS_FILE))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        first = str(exc).splitlines()[1:3]
        raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not match model.* of {folder / CONFIG_FILE} "
                         f"({' '.join(line.strip() for line in first)})") from exc
    return model.to(device or "cpu").eval(), cfg


def model_signature(cfg: Config):
    """MLflow signature: float32 ``(-1, C, -1, -1, -1)`` in, logits ``(-1, K, -1, -1, -1)`` out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.model.in_channels, -1, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.model.num_classes, -1, -1, -1), "logits")]),
    )


def pinned_requirements() -> list[str]:
    """``pkg==version`` of the installed torch, MONAI, nibabel and safetensors (the pyfunc's needs)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "monai", "nibabel", "safetensors")]


def log_model(model_dir: str | Path, *, registered_name: str | None = REGISTERED_MODEL_NAME,
              alias: str | None = CHAMPION_ALIAS, name: str = "model") -> dict[str, Any]:
    """Log a model folder to the active MLflow run as a pyfunc and (optionally) register it under an alias.

    The pyfunc is ``dualssl/serving.py`` logged as models from code, with the folder as its artifact
    (``artifacts/model_folder/``: safetensors, config, TorchScript, metadata): loading it unpickles
    nothing. Call inside ``mlflow.start_run()``. Returns ``{"model_uri", "registered_uri", "version"}``
    (the last two None when ``registered_name`` is None).
    """
    import mlflow

    from dualssl import serving

    if mlflow.active_run() is None:
        raise RuntimeError("dualssl.export.log_model: no active MLflow run; call it inside mlflow.start_run()")
    _, cfg = load_model(model_dir)  # refuses an incomplete or inconsistent folder before logging it
    with warnings.catch_warnings():
        # The signature is given (model_signature) and the model takes a tensor, not a DataFrame:
        # MLflow's advice to add type hints or an input example does not apply.
        warnings.filterwarnings("ignore", message=".*(type hints|input example was not provided)", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=serving.__file__, artifacts={serving.ARTIFACT: str(Path(model_dir))},
            signature=model_signature(cfg), pip_requirements=pinned_requirements(),
            registered_model_name=registered_name, await_registration_for=60)
    result: dict[str, Any] = {"model_uri": info.model_uri, "registered_uri": None, "version": None}
    if registered_name:
        version = info.registered_model_version
        if version is None:  # older servers: look the version up by the model's source
            client = mlflow.MlflowClient()
            version = max(int(v.version) for v in client.search_model_versions(f"name='{registered_name}'"))
        result["version"] = int(version)
        result["registered_uri"] = f"models:/{registered_name}/{version}"
        if alias:
            mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, str(version))
            result["registered_uri"] = f"models:/{registered_name}@{alias}"
    return result
