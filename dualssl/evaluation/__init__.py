"""Evaluation: whole-volume inference, metrics per case / site / across sites, reports.

``metrics`` and ``postprocess`` are plain functions on arrays; ``inference.Predictor`` runs a model
on volumes and files; ``run`` glues checkpoints, datasets and the CSV/JSON reports together.

The names below are loaded on first use (PEP 562): ``import dualssl.evaluation.metrics`` must not
import MONAI (about 8 s on a CPU node: its ``__init__`` loads every submodule), since every Ray Tune
trial actor and Train controller that unpickles the study's functions would pay for it.
"""

from importlib import import_module
from typing import Any

_LAZY = {"Predictor": "dualssl.evaluation.inference", "case_metrics": "dualssl.evaluation.metrics",
         "summarise": "dualssl.evaluation.metrics", "keep_large_components": "dualssl.evaluation.postprocess"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
