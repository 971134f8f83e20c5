"""Callbacks: how the engine reports metrics and saves checkpoints without knowing who listens.

``dualssl train`` uses :class:`ConsoleLogger`, :class:`CheckpointSaver` and :class:`RunSummary`;
the Ray study passes callbacks that call ``ray.train.report``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dualssl.engine.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from dualssl.engine.fit import FitResult, Trainer


class Callback:
    """Base class; every hook is optional."""

    def on_train_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, float],
                     state_fn: Callable[[], dict[str, Any]]) -> None:
        """``metrics`` of the finished epoch; ``state_fn()`` builds the checkpoint (call on rank 0 only)."""

    def on_train_end(self, trainer: "Trainer", result: "FitResult") -> None:
        pass


class ConsoleLogger(Callback):
    """One line per epoch on the main process."""

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        if not trainer.is_main_process:
            return
        shown = ("loss", "loss_seg", "loss_con", "loss_rec", "rec_ratio", "val_dice_patch", "val_dice", "lr")
        text = "  ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics and not math.isnan(metrics[k]))
        if metrics.get("nonfinite_steps", 0) > 0:
            text += f"  SKIPPED {int(metrics['nonfinite_steps'])} non-finite steps"
        trainer.write(f"epoch {epoch:4d}  {text}")


class CheckpointSaver(Callback):
    """``checkpoint_latest.pt`` every epoch, ``checkpoint_best.pt`` when the selection metric improves."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        if not trainer.is_main_process:
            return
        state = state_fn()
        save_checkpoint(self.out_dir / "checkpoint_latest.pt", state)
        if trainer.best_epoch == epoch:
            save_checkpoint(self.out_dir / "checkpoint_best.pt", state)


class RunSummary(Callback):
    """nnU-Net style run record: ``summary.json`` (history, best) and ``progress.png`` per epoch."""

    def __init__(self, out_dir: str | Path, plot: bool = True):
        self.out_dir = Path(out_dir)
        self.plot = plot

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        if not trainer.is_main_process:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"config": trainer.cfg.to_dict(), "best_epoch": trainer.best_epoch,
                   "best_metric": trainer.best_metric, "selection_metric": trainer.cfg.eval.selection_metric,
                   "history": trainer.history}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        if self.plot:
            plot_progress(trainer.history, self.out_dir / "progress.png")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def plot_progress(history: list[dict[str, float]], path: str | Path) -> Path:
    """Loss parts (left axis) and validation Dice (right axis) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "loss_seg", "loss_con", "loss_rec"):
        if any(key in h for h in history):
            ax.plot(epochs, [h.get(key, math.nan) for h in history], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key, style in (("val_dice_patch", "--"), ("val_dice", "-o")):
        # only measured epochs (unmeasured ones are NaN): a line through the measured points
        points = [(e, h[key]) for e, h in zip(epochs, history) if not math.isnan(h.get(key, math.nan))]
        if points:
            ax2.plot(*zip(*points), style, color="black", label=key, ms=3)
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
