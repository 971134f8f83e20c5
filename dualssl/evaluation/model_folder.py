"""Reading a model folder: the network and the Config an exported model runs with.

A model folder (written by ``dualssl.export.export_model``) holds ``model.safetensors``,
``config.yaml`` (architecture, preprocessing spec ``data.*`` and inference settings ``eval.*``),
``model.ts`` and ``metadata.json``. Reading one lives here, in evaluation, so that ``dualssl predict``,
``dualssl evaluate --model`` and the MLflow pyfunc (``dualssl.serving``) load it without importing
``dualssl.export`` (which writes folders from engine checkpoints: export -> engine -> evaluation, one
way). ``dualssl.export`` re-exports :func:`load_model`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dualssl.config import Config

MODEL_FORMAT = "dualssl-model/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TORCHSCRIPT_FILE = "model.ts"
METADATA_FILE = "metadata.json"
ARTIFACT = "model_folder"
"""Name of the model folder in the pyfunc's ``artifacts`` (``artifacts/model_folder/`` in the model)."""
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file:/")


def segmentation_net(cfg: Config, model_state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """``SegmentationNet`` for ``cfg.model`` in eval mode; ``model_state`` is a DualSSLNet state dict."""
    from dualssl.models import SegmentationNet, build_model

    net = build_model(cfg.model)
    if model_state is not None:
        net.load_state_dict(model_state)
    return SegmentationNet(net).eval()


def is_uri(source: str | Path) -> bool:
    """Whether ``source`` is an MLflow model / artifact URI rather than a local folder."""
    return any(str(source).startswith(s) for s in URI_SCHEMES)


def _pyfunc_artifact(model_dir: Path) -> Path:
    """The model folder inside a downloaded pyfunc (``MLmodel`` names it), or ``model_dir`` itself."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return model_dir
    pyfunc = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    path = ((pyfunc.get("artifacts") or {}).get(ARTIFACT) or {}).get("path")
    return model_dir / path if path else model_dir


def resolve_folder(source: str | Path, download_dir: str | Path | None = None) -> Path:
    """A local model folder for ``source`` (downloading an MLflow model URI when needed)."""
    if not is_uri(str(source)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: model folder not found; give a folder written by "
                                    "dualssl.export.export_model or an MLflow URI such as models:/NAME@champion")
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


def load_folder(folder: str | Path, device: str | torch.device | None = None) -> tuple[torch.nn.Module, Config]:
    """``(SegmentationNet, Config)`` of a local model folder; errors name the missing or mismatched file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; {folder} is not a complete dualssl model "
                                    "folder (re-export it with dualssl.export.export_model)")
    cfg = Config.load(folder / CONFIG_FILE).validate()
    model = segmentation_net(cfg)
    weights = load_file(str(folder / WEIGHTS_FILE))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        first = str(exc).splitlines()[1:3]
        raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not match model.* of {folder / CONFIG_FILE} "
                         f"({' '.join(line.strip() for line in first)})") from exc
    return model.to(device or "cpu").eval(), cfg


def load_model(source: str | Path, device: str | torch.device | None = None, *,
               download_dir: str | Path | None = None) -> tuple[torch.nn.Module, Config]:
    """Load ``(SegmentationNet, Config)`` from a model folder or an MLflow model URI.

    Args:
        source: a folder written by ``dualssl.export.export_model``, or ``models:/NAME@ALIAS``,
            ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``.
        device: where to put the network (default CPU); it is returned in eval mode.
        download_dir: where an MLflow URI is downloaded (default: a new temp dir).

    Returns:
        ``(model, cfg)``: ``model(x (B, 1, X, Y, Z)) -> logits (B, K, X, Y, Z)``.
    """
    try:
        folder = resolve_folder(source, download_dir)
    except Exception as exc:  # MlflowException: a registered model, version or alias that is not there
        if type(exc).__name__ != "MlflowException":
            raise
        import mlflow

        raise FileNotFoundError(
            f"{source}: not found in the MLflow store {mlflow.get_registry_uri()} (tracking URI "
            f"{mlflow.get_tracking_uri()}): {str(exc).splitlines()[0][:300]}; pass the store the study "
            "registered it in with --tracking-uri (or MLFLOW_TRACKING_URI), e.g. "
            "sqlite:////abs/path/study/mlflow.db, or give an exported model folder") from exc
    return load_folder(folder, device)
