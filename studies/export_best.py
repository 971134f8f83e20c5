"""Export the best trial of a finished study as a model folder, logged and registered in MLflow.

    python studies/export_best.py --study ~/dualssl-studies/dualssl-study

Reads ``study.json`` and ``trials.json`` in the study folder, takes the best trial's best
checkpoint (the epoch chosen by the selection metric, not the last one), writes
``STUDY/model`` (safetensors, config, TorchScript, metadata: ``dualssl.export``), logs it to the
study's parent MLflow run as a pyfunc (``dualssl.export.log_model``: no pickle) and registers it
under the study's model name (``model_name`` in ``study.json``, default ``dualssl-pancreas``) with
the alias ``champion``; a study with ``"selection": "oracle"`` (trials ranked on the unseen sites) is
registered under ``NAME-oracle`` as ``@oracle`` and tagged not deployable, and a smoke study's model name is ``NAME-smoke`` (:func:`registry_target`). Each version carries the tags of
:func:`version_tags`. ``dualssl predict --model STUDY/model`` or
``--model models:/dualssl-pancreas@champion`` then segments NIfTI scans with it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python studies/export_best.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualssl.config import Config  # noqa: E402
from dualssl.export import (CHAMPION_ALIAS, ORACLE_ALIAS, REGISTERED_MODEL_NAME, export_model,  # noqa: E402
                            log_model)


def read_study(study_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    study_dir = Path(study_dir)
    for name in ("study.json", "trials.json"):
        if not (study_dir / name).is_file():
            raise FileNotFoundError(f"{study_dir / name}: missing; is {study_dir} the folder of a finished "
                                    "study (studies/tune.py writes both at its end)?")
    return json.loads((study_dir / "study.json").read_text()), json.loads((study_dir / "trials.json").read_text())


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    # the same rule as studies.finish.pick_best: only completed trials (not errored, not stopped) compete
    scored = [r for r in rows if isinstance(r.get("objective"), (int, float)) and math.isfinite(r["objective"])
              and r.get("best_checkpoint") and r.get("status", "completed") == "completed"]
    if not scored:
        raise ValueError("no trial of this study has a score and a checkpoint; nothing to export")
    return max(scored, key=lambda r: r["objective"])


def load_trial_checkpoint(path: str, storage: str) -> dict[str, Any]:
    """The engine state of a Ray Train checkpoint folder on local or shared (s3://, gs://) storage."""
    from dualssl.engine import load_checkpoint
    from studies.train_loop import CHECKPOINT_FILE

    if "://" not in storage:
        return load_checkpoint(Path(path) / CHECKPOINT_FILE)
    import pyarrow.fs
    import ray.train

    fs = pyarrow.fs.FileSystem.from_uri(storage)[0]
    with tempfile.TemporaryDirectory(prefix="dualssl-best-") as tmp:
        ray.train.Checkpoint(path, filesystem=fs).to_directory(tmp)
        return load_checkpoint(Path(tmp) / CHECKPOINT_FILE)


def validation_dice(model_dir: str | Path, device: str = "cpu") -> float:
    """Whole-volume Dice of an exported model on its source validation cases, computed by the
    engine's own ``validate_volumes`` (same split, same predictor, same Dice)."""
    from dualssl.engine import Trainer
    from dualssl.export import load_model

    model, cfg = load_model(model_dir, device=device)
    trainer = Trainer(cfg, device=device)
    trainer.data = trainer.build_data()
    trainer.net = model  # validate_volumes wraps .backbone/.seg_head, which SegmentationNet has
    return trainer.validate_volumes()


ORACLE_SUFFIX = "-oracle"
SMOKE_SUFFIX = "-smoke"
ORACLE_WARNING = (f"false: trials were ranked on the unseen test sites (selection oracle); registered under "
                  f"NAME{ORACLE_SUFFIX} as @{ORACLE_ALIAS}, never as a deployable @{CHAMPION_ALIAS}")


def registry_alias(manifest: dict[str, Any]) -> str:
    """``champion`` for a fair (source-validation) selection, ``oracle`` when the test sites chose it."""
    return ORACLE_ALIAS if manifest.get("selection") == "oracle" else CHAMPION_ALIAS


def registry_target(manifest: dict[str, Any]) -> tuple[str, str]:
    """``(registered model name, alias)`` of a study's export.

    A source-val study registers under the study's model name (``model_name`` in ``study.json``,
    ``--model-name``; default ``dualssl-pancreas``) as ``@champion``; an oracle study under
    ``NAME-oracle`` as ``@oracle``, so it never moves ``NAME@champion`` nor adds a version to ``NAME``
    (``models:/NAME/latest`` stays a fairly selected model). ``tune.py --smoke-test`` writes
    ``NAME-smoke`` as the model name: a smoke study never touches a user's model."""
    name = manifest.get("model_name") or REGISTERED_MODEL_NAME
    if manifest.get("selection") == "oracle":
        return f"{name}{ORACLE_SUFFIX}", ORACLE_ALIAS
    return name, CHAMPION_ALIAS


def version_tags(manifest: dict[str, Any], best: dict[str, Any], cfg: Config) -> dict[str, str]:
    """What a reviewer needs on a registered version: study, selection, dataset digest (the trial runs'
    MLflow dataset digest), source site(s), trial, objective, and per unseen site its reported Dice with n
    (``dice/<site>``, e.g. ``0.812 (n=5)``; the phantom's numbers say nothing about real hospitals)."""
    from studies.tracking import dataset_input

    metrics = best.get("metrics", {})
    tags = {"study": str(manifest.get("experiment")), "selection": str(manifest.get("selection")),
            "selection_metric": str(manifest.get("selection_metric", cfg.eval.selection_metric)),
            "source_site": ",".join(manifest.get("source_sites") or cfg.data.source_sites),
            "trial_id": str(best["trial_id"]), "objective": f"{best['objective']:.6g}",
            "config_hash": cfg.hash()}
    try:
        tags["dataset_digest"] = dataset_input(cfg).dataset.digest
        tags["dataset"] = str(cfg.data.root)
    except (OSError, ValueError) as exc:  # the data root moved since the study ran
        tags["dataset_digest"] = f"unknown ({type(exc).__name__}: {str(exc)[:200]})"
    sites = sorted({k.split("/")[1] for k in metrics if k.startswith("site/") and k.count("/") == 2})
    for site in sites:
        if metrics.get(f"site/{site}/source") == 1.0 or f"site/{site}/dice_mean" not in metrics:
            continue
        n = metrics.get(f"site/{site}/n")
        tags[f"dice/{site}"] = f"{metrics[f'site/{site}/dice_mean']:.4f} (n={int(n) if n is not None else '?'})"
    if isinstance(metrics.get("mean_unseen_dice"), (int, float)):
        tags["mean_unseen_dice"] = f"{metrics['mean_unseen_dice']:.4f}"
    return tags


def export_study(study_dir: str | Path, *, register: bool = True, out: str | Path | None = None) -> dict[str, Any]:
    """Best trial -> ``STUDY/model`` (+ MLflow model, registered by :func:`registry_target` with
    :func:`version_tags`). Returns paths/URIs."""
    import mlflow

    study_dir = Path(study_dir)
    manifest, rows = read_study(study_dir)
    best = best_row(rows)
    state = load_trial_checkpoint(best["best_checkpoint"], manifest["storage"])
    metadata = {"trial_id": best["trial_id"], "study": manifest["experiment"], "selection": manifest["selection"],
                "source_sites": manifest["source_sites"], "objective": best["objective"],
                "reported": best.get("metrics", {}), "params": best.get("params", {}),
                "checkpoint": best["best_checkpoint"], "mlflow_run_id": best.get("run_id")}
    model_dir = export_model(state, Path(out) if out else study_dir / "model", metadata=metadata)
    cfg = Config.from_dict(state["config"])
    result: dict[str, Any] = {"model_dir": str(model_dir), "registered_uri": None, "best_trial_id": best["trial_id"],
                              "config_hash": cfg.hash()}
    if register and manifest.get("tracking_uri"):
        name, alias = registry_target(manifest)
        mlflow.set_tracking_uri(manifest["tracking_uri"])
        with mlflow.start_run(run_id=manifest["parent_run_id"]):
            logged = log_model(model_dir, registered_name=name, alias=alias, tags=version_tags(manifest, best, cfg))
            if alias == ORACLE_ALIAS:
                mlflow.set_tag("deployable", ORACLE_WARNING)
                print(f"studies/export_best.py: {ORACLE_WARNING}", file=sys.stderr)
        result.update(logged)
        result.update({"alias": alias, "registered_name": name})
    (study_dir / "export.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="studies/export_best.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="the study folder (holds study.json)")
    p.add_argument("--out", type=Path, help="model folder (default STUDY/model)")
    p.add_argument("--no-register", action="store_true", help="write the folder only, no MLflow")
    p.add_argument("--verify", action="store_true", help="recompute the source validation Dice of the export")
    args = p.parse_args(argv)
    try:
        result = export_study(args.study, register=not args.no_register, out=args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"studies/export_best.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"model folder: {result['model_dir']}")
    if result.get("registered_uri"):
        print(f"registered:   {result['registered_uri']}")
    if args.verify:
        reported = best_row(read_study(args.study)[1])["metrics"]
        key = next(k for k in reported if k.startswith("best_"))
        print(f"validation Dice of the export {validation_dice(result['model_dir']):.4f} "
              f"(reported {reported[key]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
