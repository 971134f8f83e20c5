"""`dualssl evaluate --model DIR|models:/NAME@ALIAS` scores an exported model as the study scored its trial.

The study's own cross-site evaluation (``studies.crosssite.evaluate_checkpoint``: source validation,
unseen report and selection parts) runs on a trial checkpoint (a seeded untrained net: noisy masks, so
any difference in the pipeline changes the Dice); the same checkpoint is exported, and
``dualssl evaluate --model`` on the folder and on its registry URI must give every case the same Dice.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from test_crosssite import write_tiny_msd

from dualssl.cli import main
from dualssl.config import Config


def _rows(text: str) -> dict[str, dict]:
    return {r["case_id"]: r for r in csv.DictReader(io.StringIO(text))}


def test_evaluate_model_reproduces_the_studys_per_case_dice_of_the_exported_trial(tmp_path, capsys):
    import mlflow

    from dualssl.engine.checkpoint import CHECKPOINT_FORMAT
    from dualssl.export import export_model, log_model
    from dualssl.models import build_model
    from studies.crosssite import evaluate_checkpoint
    from studies.train_loop import CHECKPOINT_FILE

    root = write_tiny_msd(tmp_path / "data", {"src": 2, "far": 3, "near": 2})
    cfg = Config().with_overrides({"model.widths": (8, 8, 8, 8), "data.patch_size": (32, 32, 16),
                                   "data.spacing": (3.0, 3.0, 5.0), "eval.sw_batch_size": 1,
                                   "data.root": str(root), "data.source_sites": "src",
                                   "data.val_fraction": 0.5, "data.split_seed": 1}).validate()
    torch.manual_seed(0)
    state = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": build_model(cfg.model).state_dict(),
             "epoch": 3}
    (tmp_path / "trial").mkdir()
    torch.save(state, tmp_path / "trial" / CHECKPOINT_FILE)
    study = evaluate_checkpoint(tmp_path / "trial", device="cpu")  # what the study logged for the trial
    files = study["files"]
    reported = {**_rows(files["per_case.csv"].decode()), **_rows(files["oracle_per_case.csv"].decode())}
    assert sorted({r["site"] for r in reported.values()}) == ["far", "near", "src"]
    assert len({r["dice"] for r in reported.values()}) > 1  # not all the same (e.g. all 0)

    folder = export_model(state, tmp_path / "model", torchscript=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("eval", str(tmp_path / "artifacts")))
        with mlflow.start_run():
            log_model(folder, registered_name="eval-test")
        tracking = mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri("")

    for source, extra in ((str(folder), []), ("models:/eval-test@champion", ["--tracking-uri", tracking])):
        out = tmp_path / f"eval-{len(extra)}"
        assert main(["evaluate", "--model", source, "--data", str(root), "--sites", "src,far,near",
                     "--out", str(out), *extra]) == 0
        assert "summary:" in capsys.readouterr().out
        ours = _rows((out / "per_case.csv").read_text())
        assert set(ours) == set(reported)  # source validation + every unseen case, as in the study
        for case_id, row in ours.items():
            for key in ("dice", "nsd", "jaccard"):
                assert float(row[key]) == pytest.approx(float(reported[case_id][key]), abs=1e-9), (case_id, key)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["settings"]["model"] == source and summary["per_site"]["src"]["n"] == 1
        assert summary["per_site"]["far"]["n"] == 3 and summary["per_site"]["near"]["n"] == 2


def test_evaluate_needs_a_checkpoint_or_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert main(["evaluate", "--model", str(tmp_path / "nowhere"), "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
