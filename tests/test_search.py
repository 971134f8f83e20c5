"""The search without training: multi-objective TPE through Ray's OptunaSearch, its Optuna journal
across a killed and resumed driver, the Pareto front and its MLflow artifact, parameter importance,
the trials' dataset inputs, and ``dualssl predict`` against an empty registry. Real Optuna, real
MLflow sqlite stores; hand-made trial results stand in for trained trials."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.config import ConfigError  # noqa: E402
from studies.objectives import objective_values, parse_objectives, source_stability  # noqa: E402
from studies.search_space import load_search_space, make_searcher, open_study, optuna_storage  # noqa: E402

NAMES = ["val_dice", "val_stability"]


def _final(dice: float, per_case: list[float], site: str = "pv_standard") -> dict:
    """A trial's final result as train_func reports it (the keys the objectives read)."""
    return {"final": 1.0, "objective": dice, "best_val_dice": dice, f"site/{site}/source": 1.0,
            f"site/{site}/n": float(len(per_case)), f"site/{site}/dice_mean": float(np.mean(per_case)),
            f"site/{site}/dice_std": float(np.std(per_case, ddof=1)), "site/cone_beam/source": 0.0,
            "site/cone_beam/n": 3.0, "site/cone_beam/dice_mean": 0.2, "site/cone_beam/dice_std": 0.5,
            "mean_unseen_dice": 0.3 + dice / 10}


def test_stability_is_the_pooled_std_of_source_validation_cases_only():
    a, b = [0.8, 0.6, 0.7], [0.9, 0.5]
    metrics = {**_final(0.7, a), **{k.replace("pv_standard", "native_thick"): v
                                    for k, v in _final(0.7, b).items() if k.startswith("site/pv_standard")}}
    assert source_stability(metrics) == pytest.approx(np.std(a + b, ddof=1), abs=1e-12)
    # the unseen site (cone_beam, std 0.5) does not enter; one validation case gives no std
    assert source_stability(_final(0.7, [0.8, 0.6])) == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert math.isnan(source_stability({"site/pv_standard/source": 1.0, "site/pv_standard/n": 1.0,
                                        "site/pv_standard/dice_mean": 0.8, "site/pv_standard/dice_std": math.nan}))
    assert parse_objectives("val_dice,val_stability") == NAMES
    with pytest.raises(ConfigError, match="--objectives"):
        parse_objectives("val_dice,test_dice")


def _searcher(journal: Path, study: str = "exp"):
    storage = optuna_storage(journal)
    open_study(storage, study, ["max", "min"], str(journal))
    searcher = make_searcher(NAMES, ["max", "min"], seed=0, n_startup_trials=2, storage=storage, study_name=study)
    searcher.set_search_properties(None, None, load_search_space())
    return searcher


def test_killed_search_resumes_the_same_optuna_study_from_its_journal(tmp_path):
    import optuna

    journal = tmp_path / "optuna.journal"
    first = _searcher(journal)
    params = first.suggest("t1")
    first.on_trial_complete("t1", _final(0.6, [0.5, 0.7]))
    first.suggest("t2")  # running when the driver dies
    del first  # the driver is killed: only the journal file is left

    second = _searcher(journal)  # a new driver (tune.py --resume, or a larger --num-samples)
    second.suggest("t3")
    second.on_trial_complete("t3", _final(0.7, [0.65, 0.75]))
    study = optuna.load_study(study_name="exp", storage=optuna_storage(journal))
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "RUNNING", "COMPLETE"] and [t.number for t in study.trials] == [0, 1, 2]
    assert study.trials[0].params == params  # the journal holds what the first driver suggested
    assert study.trials[0].values == pytest.approx([0.6, np.std([0.5, 0.7], ddof=1)])

    # Tune's own checkpoint of the searcher (pickled) writes into the same journal after a restore
    second.suggest("t4")
    second.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(NAMES, ["max", "min"], seed=0)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t4", {"objective": 0.1, "epochs_done": 1})  # stopped early: PRUNED
    study = optuna.load_study(study_name="exp", storage=optuna_storage(journal))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "COMPLETE", "PRUNED"]
    # a study of other objectives in the same journal is refused, naming the journal
    with pytest.raises(ConfigError, match=str(journal)):
        open_study(optuna_storage(journal), "exp", ["max"], str(journal))


def _row(trial_id: str, dice: float, per_case: list[float]) -> dict:
    metrics = {k: v for k, v in _final(dice, per_case).items() if k not in ("final", "objective")}
    return {"trial_id": trial_id, "status": "completed", "objective": dice, "metrics": metrics,
            "params": {}, "best_checkpoint": f"/ck/{trial_id}"}


def test_two_objective_search_logs_a_pareto_front_of_non_dominated_trials(tmp_path):
    import mlflow

    from studies.finish import _search_outcome
    from studies.pareto import DICE_TOLERANCE
    from studies.tracking import log_study_summary, start_parent_run

    journal = tmp_path / "optuna.journal"
    searcher = _searcher(journal, "pareto")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):  # the real searcher proposes, hand-made results stand in for training
        tid = f"t{i:04d}"
        searcher.suggest(tid)
        dice = float(rng.uniform(0.5, 0.9))
        per_case = list(rng.uniform(dice - 0.2 * rng.random(), dice + 0.2 * rng.random(), size=3))
        searcher.on_trial_complete(tid, _final(dice, per_case))
        rows.append(_row(tid, dice, per_case))
    rows.append({**_row("t_stop", 0.99, [0.99, 0.99]), "status": "stopped early (ASHA)"})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "pareto", "study-pareto", {"role": "study"}, {})
    manifest = {"objectives": NAMES, "optuna_storage": str(journal), "optuna_study": "pareto"}
    front, lines, files = _search_outcome(tmp_path, manifest, rows, None)
    log_study_summary(uri, parent, rows, None, tmp_path, files)

    client = mlflow.MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/pareto.json", "search/pareto.png", "search/importance.csv", "search/importance.png",
            "search/slice_val_dice.png"} <= logged
    pareto = json.loads(Path(client.download_artifacts(parent, "search/pareto.json", str(tmp_path / "dl"))).read_text())
    # independent check: from the rows, a trial is on the front iff no other completed trial is at
    # least as good on both objectives and better on one
    values = {r["trial_id"]: (r["objective"], objective_values(r["metrics"], NAMES)["val_stability"])
              for r in rows if r["status"] == "completed"}
    expected = sorted(t for t, (d, s) in values.items()
                      if not any(d2 >= d and s2 <= s and (d2 > d or s2 < s) for d2, s2 in values.values()))
    assert sorted(pareto["front"]) == expected and "t_stop" not in json.dumps(pareto["points"])
    top = max(values[t][0] for t in expected)
    near = [t for t in expected if values[t][0] >= top - DICE_TOLERANCE]
    assert pareto["chosen"] == min(near, key=lambda t: values[t][1])
    assert pareto["colour"] == "mean_unseen_dice: not used for selection"
    assert any("Pareto front" in line for line in lines)


def test_importance_of_every_searched_parameter_on_a_hand_built_study(tmp_path):
    import optuna

    from studies.importance import write_importance

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"loss.lambda_con": (0.01, 1.0), "loss.tau": (0.01, 1.0), "loss.corruption_ratio": (0.1, 0.9)}

    def trial_values(t):
        p = {k: t.suggest_float(k, lo, hi, log=k != "loss.corruption_ratio") for k, (lo, hi) in space.items()}
        return math.log(p["loss.tau"]), (p["loss.corruption_ratio"] - 0.5) ** 2  # Dice: tau; instability: r

    study.optimize(trial_values, n_trials=8)
    info = write_importance(study, NAMES, tmp_path)
    assert set(info["importances"]) == set(NAMES)
    for name in NAMES:
        assert set(info["importances"][name]) == set(space)
        assert sum(info["importances"][name].values()) == pytest.approx(1.0, abs=1e-6)
    assert max(info["importances"]["val_dice"], key=info["importances"]["val_dice"].get) == "loss.tau"
    for name in ("importance.csv", "importance.json", "importance.png", "slice_val_dice.png"):
        assert (tmp_path / name).is_file()

    few = optuna.create_study(direction="maximize")
    few.optimize(lambda t: t.suggest_float("loss.tau", 0.01, 1.0), n_trials=2)
    (tmp_path / "few").mkdir()
    info = write_importance(few, ["val_dice"], tmp_path / "few")
    assert info["importances"] == {} and "2 completed trial(s)" in info["note"]


def test_trial_dataset_input_names_cases_preprocessing_and_sites(phantom_root):
    from dualssl.config import Config
    from studies.tracking import dataset_input

    cfg = Config().with_overrides({"data.root": str(phantom_root), "data.source_sites": ["pv_standard"]})
    first, again = dataset_input(cfg), dataset_input(cfg)
    assert first.dataset.digest == again.dataset.digest and first.dataset.source_type == "local"
    assert json.loads(first.dataset.source)["uri"] == str(phantom_root)
    profile = json.loads(first.dataset.profile)
    assert profile["num_cases"] == 15 and profile["sites"]["pv_standard"]["val"] >= 1
    assert profile["sites"]["cone_beam"]["test"] == 5 and profile["sites"]["cone_beam"]["train"] == 0
    other = dataset_input(cfg.with_overrides({"data.spacing": (2.0, 2.0, 3.0)}))
    assert other.dataset.digest != first.dataset.digest  # preprocessing is part of the digest


def test_predict_says_which_store_lacks_the_registered_model(tmp_path):
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    done = subprocess.run([sys.executable, "-m", "dualssl.cli", "predict", "--model", "models:/dualssl-pancreas@champion",
                           "--tracking-uri", store, str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"not found in the MLflow store {store}" in done.stderr and "Traceback" not in done.stderr


def test_preflight_refuses_bad_objectives():
    from studies.tune import build_parser, prepare

    with pytest.raises(ConfigError) as info:
        prepare(build_parser().parse_args(["--smoke-test", "--objectives", "val_dice,val_stability",
                                           "--selection", "oracle", "--storage-path", "/tmp/x"]))
    assert "--selection oracle" in str(info.value)
