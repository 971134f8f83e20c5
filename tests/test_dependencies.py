"""Dependency ranges users can trust: what each range rests on, checked on the installed versions.

The ranges are stated in pyproject.toml. Behaviour that depends on the version is tested where it is
used (tests/test_serving.py: MLflow 3's models-from-code pyfunc; tests/test_resume_asha.py: Ray's ASHA
rungs); here: torch 2.9.x is excluded, and the Optuna 5 behaviour the study relies on.
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _requirement(name: str):
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == name]
    return req


def test_torch_2_9_is_excluded_and_the_installed_torch_is_allowed():
    import torch

    spec = _requirement("torch").specifier
    assert not any(spec.contains(v) for v in ("2.9.0", "2.9.1", "2.9.2"))  # pytorch issue 166122
    assert all(spec.contains(v) for v in ("2.6.0", "2.8.0", "2.10.0", "2.13.0"))
    assert spec.contains(torch.__version__.split("+")[0])


def _study(n: int = 40):
    """A study whose objective depends on ``x`` only: ``-(x - 0.3)^2``, ``y`` is noise-free padding."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -(t.suggest_float("x", 0, 1) - 0.3) ** 2 + 0 * t.suggest_float("y", 0, 1), n_trials=n)
    return study


def test_importance_uses_the_named_fanova_evaluator_not_optunas_default():
    """studies/importance.py names FanovaImportanceEvaluator(seed=0); Optuna 5's default is PED-ANOVA."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    from studies.importance import param_importances

    study = _study()
    info = param_importances(study, ["objective"])
    assert info["evaluator"] == "FanovaImportanceEvaluator"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fanova = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
        default = get_param_importances(study, normalize=True)
        pedanova = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), normalize=True)
    assert info["importances"]["objective"] == pytest.approx(dict(fanova), abs=1e-12)
    assert info["importances"]["objective"]["x"] > 0.9  # the truth: only x matters
    # Optuna 5's default evaluator is PED-ANOVA (Optuna 4's was fANOVA): the study does not rely on it
    assert dict(default) == pytest.approx(dict(pedanova), abs=1e-12) and int(optuna.__version__.split(".")[0]) >= 5


def test_the_studys_tpe_runs_with_optuna_5_defaults():
    """make_searcher leaves TPE's constant liar and multivariate mode at Optuna 5's defaults (on; in
    Optuna 4 both were off): the ranges pin the 5.0 series so that a study samples the same way."""
    from studies.search_space import make_searcher

    sampler = make_searcher("objective", "max", seed=0)._sampler
    study = _study(3)
    assert sampler._constant_liar is True
    assert sampler._is_multivariate(study) is True
    assert _requirement("optuna").specifier.contains("5.0.0") and not _requirement("optuna").specifier.contains("4.5.0")
