"""dualssl.export: model folders written from real checkpoints, reloaded, TorchScript, MLflow registry."""

from __future__ import annotations

import json

import pytest
import torch

from dualssl.config import Config
from dualssl.engine.checkpoint import save_checkpoint
from dualssl.export import (CONFIG_FILE, METADATA_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, export_model,
                            load_model, log_model)
from dualssl.models import SegmentationNet, build_model


def _checkpoint(tmp_path):
    cfg = Config()
    cfg.with_overrides({"model.widths": (8, 16, 32, 64), "data.patch_size": (32, 32, 16),
                        "data.spacing": (3.0, 3.0, 4.0)})
    torch.manual_seed(0)
    net = build_model(cfg.model)
    with torch.no_grad():  # non-default weights, so a loader that ignored them would be caught
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"format": "dualssl-checkpoint/1", "config": cfg.to_dict(), "model": net.state_dict(),
             "epoch": 3, "best_metric": 0.5, "best_epoch": 2}
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    return path, net, cfg


def test_folder_round_trip_reproduces_logits_and_config(tmp_path):
    path, net, cfg = _checkpoint(tmp_path)
    folder = export_model(path, tmp_path / "model", metadata={"trial_id": "abc"})
    for name in (WEIGHTS_FILE, CONFIG_FILE, TORCHSCRIPT_FILE, METADATA_FILE):
        assert (folder / name).is_file(), name
    model, loaded_cfg = load_model(folder)
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = SegmentationNet(net).eval()(x)
        assert torch.equal(model(x), expected)
        scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE))
        assert torch.allclose(scripted(x), expected, atol=1e-6)
    assert loaded_cfg.hash() == cfg.hash() and loaded_cfg.data.spacing == (3.0, 3.0, 4.0)
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["training"]["trial_id"] == "abc" and meta["training"]["best_epoch"] == 2
    assert meta["input"]["spacing_mm"] == [3.0, 3.0, 4.0] and meta["output"]["kind"] == "logits"


def test_load_model_errors_name_the_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nowhere")
    path, _, _ = _checkpoint(tmp_path)
    folder = export_model(path, tmp_path / "model", torchscript=False)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_model(folder)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path, _, _ = _checkpoint(tmp_path)
    folder = export_model(path, tmp_path / "model", torchscript=False)
    other = Config.load(folder / CONFIG_FILE)
    other.model.widths = (16, 32, 64, 128)
    other.save(folder / CONFIG_FILE)
    with pytest.raises(ValueError, match="do not match"):
        load_model(folder)


def test_log_model_registers_champion_that_loads_back(tmp_path):
    import mlflow

    path, net, _ = _checkpoint(tmp_path)
    folder = export_model(path, tmp_path / "model")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("export-test")
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_model(folder)
    with mlflow.start_run():
        logged = log_model(folder)
    assert logged["registered_uri"] == "models:/dualssl-pancreas@champion" and logged["version"] == 1
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("dualssl-pancreas", "champion").version) == "1"
    signature = mlflow.models.get_model_info(logged["model_uri"]).signature
    assert signature.inputs.inputs[0].shape == (-1, 1, -1, -1, -1)
    model, cfg = load_model(logged["registered_uri"], download_dir=tmp_path / "dl")
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model(x), SegmentationNet(net).eval()(x))
    mlflow.set_tracking_uri("")
