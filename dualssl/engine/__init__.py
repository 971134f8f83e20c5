"""Training engine without Ray: ``fit(cfg, callbacks=...)`` and the overridable ``Trainer``."""

from dualssl.engine.callbacks import Callback, CheckpointSaver, ConsoleLogger, RunSummary
from dualssl.engine.checkpoint import load_checkpoint, save_checkpoint
from dualssl.engine.fit import FitResult, Trainer, fit

__all__ = ["Callback", "CheckpointSaver", "ConsoleLogger", "RunSummary", "FitResult", "Trainer", "fit",
           "load_checkpoint", "save_checkpoint"]
