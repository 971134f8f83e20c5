"""dualssl.export: model folders written from real checkpoints, reloaded, TorchScript, MLflow registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualssl.config import Config
from dualssl.engine.checkpoint import save_checkpoint
from dualssl.export import (CONFIG_FILE, METADATA_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, export_model,
                            load_model, log_model)
from dualssl.models import SegmentationNet, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/


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


def _sqlite_store(tmp_path, experiment: str) -> None:
    """A real sqlite tracking store with its artifacts under tmp_path (not ./mlruns)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(experiment, str(tmp_path / "artifacts")))


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
    _sqlite_store(tmp_path, "export-test")
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


def test_registered_model_is_a_pyfunc_that_loads_without_unpickling(tmp_path):
    import mlflow

    from dualssl.export import pinned_requirements

    path, net, _ = _checkpoint(tmp_path)
    folder = export_model(path, tmp_path / "model")
    _sqlite_store(tmp_path, "pyfunc-test")
    try:
        with mlflow.start_run():
            logged = log_model(folder)
        local = Path(mlflow.artifacts.download_artifacts(logged["registered_uri"], dst_path=str(tmp_path / "dl")))
        files = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
        pickled = [f for f in files if f.endswith((".pkl", ".pth", ".pickle")) or f.startswith("data/")]
        assert not pickled, f"pickled objects in the registered model: {pickled}"
        assert "artifacts/model/model.safetensors" in files and "serving.py" in files
        requirements = (local / "requirements.txt").read_text().split()
        assert set(pinned_requirements()) <= set(requirements)
        assert f"torch=={torch.__version__.split('+')[0]}" in requirements

        pyfunc = mlflow.pyfunc.load_model(logged["registered_uri"])
        x = torch.rand(1, 1, 32, 32, 16)  # one window of data.patch_size: the blend is the identity
        logits = pyfunc.predict(x.numpy())
        with torch.no_grad():
            expected = SegmentationNet(net).eval()(x).numpy()
        assert logits.shape == (1, 2, 32, 32, 16)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        bigger = pyfunc.predict(torch.rand(1, 1, 40, 36, 20).numpy())  # several windows
        assert bigger.shape == (1, 2, 40, 36, 20) and np.isfinite(bigger).all()
        model, _ = load_model(logged["registered_uri"], download_dir=tmp_path / "dl2")
        with torch.no_grad():
            assert torch.equal(model(x), SegmentationNet(net).eval()(x))
    finally:
        mlflow.set_tracking_uri("")


@pytest.mark.parametrize("selection, alias", [("source-val", "champion"), ("oracle", "oracle")])
def test_oracle_selected_study_is_never_registered_as_champion(tmp_path, capsys, selection, alias):
    import mlflow

    from studies.export_best import main
    from studies.train_loop import CHECKPOINT_FILE

    path, _, _ = _checkpoint(tmp_path)
    trial_dir = tmp_path / "runs" / "trial_0" / "checkpoint_000002"
    trial_dir.mkdir(parents=True)
    path.rename(trial_dir / CHECKPOINT_FILE)
    _sqlite_store(tmp_path, "study")
    with mlflow.start_run(run_name="study") as parent:
        pass
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({
        "experiment": "study", "selection": selection, "source_sites": ["pv_standard"], "storage": str(tmp_path),
        "tracking_uri": mlflow.get_tracking_uri(), "parent_run_id": parent.info.run_id}))
    (study / "trials.json").write_text(json.dumps([
        {"trial_id": "t0", "objective": 0.6, "best_checkpoint": str(trial_dir), "metrics": {"best_val_dice": 0.6}},
        {"trial_id": "t1", "objective": None, "best_checkpoint": None}]))
    assert main(["--study", str(study)]) == 0
    err = capsys.readouterr().err
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("dualssl-pancreas", alias)
    aliases = client.get_registered_model("dualssl-pancreas").aliases
    assert set(aliases) == {alias} and str(aliases[alias]) == str(version.version)
    exported = json.loads((study / "export.json").read_text())
    assert exported["registered_uri"] == f"models:/dualssl-pancreas@{alias}" and exported["alias"] == alias
    deployable = client.get_run(parent.info.run_id).data.tags.get("deployable")
    if selection == "oracle":
        assert "not a deployable @champion" in err and deployable.startswith("false")
    else:
        assert "oracle" not in err and deployable is None
    mlflow.set_tracking_uri("")
