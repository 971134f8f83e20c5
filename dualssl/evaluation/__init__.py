"""Evaluation: whole-volume inference, metrics per case / site / across sites, reports.

``metrics`` and ``postprocess`` are plain functions on arrays; ``inference.Predictor`` runs a model
on volumes and files; ``run`` glues checkpoints, datasets and the CSV/JSON reports together.
"""

from dualssl.evaluation.inference import Predictor
from dualssl.evaluation.metrics import case_metrics, summarise
from dualssl.evaluation.postprocess import keep_large_components

__all__ = ["Predictor", "case_metrics", "keep_large_components", "summarise"]
