"""dualssl.export: model folders written from real checkpoints, reloaded, TorchScript, MLflow registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dualssl.config import Config
from dualssl.engine.checkpoint import save_checkpoint
from dualssl.export import (CONFIG_FILE, METADATA_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, export_model,
                            load_model, log_model)
from dualssl.models import SegmentationNet, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/


def _checkpoint(tmp_path, data_root=None):
    cfg = Config()
    if data_root is not None:
        cfg.data.root = str(data_root)
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
    assert signature.inputs.input_names()[0] == "nifti"  # the pipeline takes scans (tests/test_serving.py)
    model, cfg = load_model(logged["registered_uri"], download_dir=tmp_path / "dl")
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model(x), SegmentationNet(net).eval()(x))
    mlflow.set_tracking_uri("")


def _study(tmp_path, name: str, selection: str, checkpoint: Path, parent_run_id: str, **extra) -> Path:
    """A finished study's folder (study.json, trials.json) whose best trial holds ``checkpoint``."""
    import mlflow

    study = tmp_path / name
    study.mkdir()
    (study / "study.json").write_text(json.dumps({
        "experiment": name, "selection": selection, "source_sites": ["pv_standard"], "storage": str(tmp_path),
        "tracking_uri": mlflow.get_tracking_uri(), "parent_run_id": parent_run_id, **extra}))
    metrics = {"best_val_dice": 0.6, "site/pv_standard/source": 1.0, "site/pv_standard/dice_mean": 0.6,
               "site/pv_standard/n": 2, "site/cone_beam/source": 0.0, "site/cone_beam/dice_mean": 0.41,
               "site/cone_beam/n": 5.0, "mean_unseen_dice": 0.41}
    (study / "trials.json").write_text(json.dumps([
        {"trial_id": "t0", "objective": 0.6, "best_checkpoint": str(checkpoint.parent), "metrics": metrics},
        {"trial_id": "t1", "objective": None, "best_checkpoint": None}]))
    return study


def test_an_oracle_export_leaves_champion_and_the_source_val_model_untouched(tmp_path, capsys, phantom_root):
    import mlflow

    from studies.export_best import main
    from studies.tracking import dataset_input
    from studies.train_loop import CHECKPOINT_FILE

    path, _, cfg = _checkpoint(tmp_path, data_root=phantom_root)
    trial_dir = tmp_path / "runs" / "trial_0" / "checkpoint_000002"
    trial_dir.mkdir(parents=True)
    path = path.rename(trial_dir / CHECKPOINT_FILE)
    _sqlite_store(tmp_path, "study")
    with mlflow.start_run(run_name="study") as parent:
        pass
    try:
        client = mlflow.MlflowClient()
        fair = _study(tmp_path, "fair", "source-val", path, parent.info.run_id)
        assert main(["--study", str(fair)]) == 0
        assert "oracle" not in capsys.readouterr().err
        before = client.get_registered_model("dualssl-pancreas")
        champion = client.get_model_version_by_alias("dualssl-pancreas", "champion")
        assert set(before.aliases) == {"champion"}
        tags = champion.tags  # what a reviewer needs on the version
        assert tags["study"] == "fair" and tags["selection"] == "source-val" and tags["source_site"] == "pv_standard"
        assert tags["dice/cone_beam"] == "0.4100 (n=5)" and "dice/pv_standard" not in tags
        assert tags["dataset_digest"] == dataset_input(cfg).dataset.digest

        oracle = _study(tmp_path, "peeked", "oracle", path, parent.info.run_id)
        assert main(["--study", str(oracle)]) == 0
        assert "never as a deployable @champion" in capsys.readouterr().err
        exported = json.loads((oracle / "export.json").read_text())
        assert exported["registered_uri"] == "models:/dualssl-pancreas-oracle@oracle"
        # the source-val model: the same versions, @champion on the same version, no @oracle
        after = client.get_registered_model("dualssl-pancreas")
        assert after.aliases == before.aliases
        assert [v.version for v in client.search_model_versions("name='dualssl-pancreas'")] == [champion.version]
        assert client.get_model_version_by_alias("dualssl-pancreas-oracle", "oracle").tags["selection"] == "oracle"
        assert set(client.get_registered_model("dualssl-pancreas-oracle").aliases) == {"oracle"}
        assert client.get_run(parent.info.run_id).data.tags["deployable"].startswith("false")

        smoke = _study(tmp_path, "smoke", "source-val", path, parent.info.run_id, model_name="dualssl-pancreas-smoke")
        assert main(["--study", str(smoke)]) == 0
        assert client.get_registered_model("dualssl-pancreas").aliases == before.aliases
        assert len(client.search_model_versions("name='dualssl-pancreas'")) == 1
    finally:
        mlflow.set_tracking_uri("")


def test_a_smoke_study_registers_under_its_own_name():
    from studies.preflight import build_parser
    from studies.tune import registered_model_name

    assert registered_model_name(build_parser().parse_args([])) == "dualssl-pancreas"
    assert registered_model_name(build_parser().parse_args(["--smoke-test"])) == "dualssl-pancreas-smoke"
    assert registered_model_name(build_parser().parse_args(["--smoke-test", "--model-name", "mine"])) == "mine-smoke"
    assert registered_model_name(build_parser().parse_args(["--model-name", "mine"])) == "mine"
