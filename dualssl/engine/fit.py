"""The training loop: small overridable steps, callbacks for reporting and checkpointing.

``Trainer`` knows nothing of Ray. The Ray study subclasses it to wrap the model and loaders for DDP
(``wrap_model``, ``wrap_loader``) and passes callbacks that report to Ray Train; ``dualssl train``
and the tests run the very same loop.

One epoch::

    for batch in loader:                      # (B, 1, *patch) image and label
        image_in, mask = loss.corrupt(image, label)        # restoration branch (identity when off)
        outputs = model(image_in, embeddings=..., restoration=...)
        parts = loss(outputs, label, image, mask)          # loss, seg, con, rec
        backward, clip, step
    validate: cheap patch Dice every epoch, whole-volume Dice every eval.val_every epochs
    callbacks.on_epoch_end(metrics, state_fn)
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from dualssl.config import Config
from dualssl.engine.callbacks import Callback
from dualssl.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, rng_state, set_rng_state
from dualssl.precision import amp_dtype


@dataclass
class FitResult:
    best_metric: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _dist_rank_world()[1] > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


class Trainer:
    """Trains a DualSSLNet on the source site(s) of ``cfg``; override a step to change it."""

    progress: bool = True

    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = (), out_dir: str | Path | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg.validate()
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = torch.device(device) if device else self.default_device()
        self.epoch = 0  # epochs completed
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.history: list[dict[str, float]] = []
        self._is_setup = False

    # --- environment ---------------------------------------------------------------------
    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def rank(self) -> int:
        return _dist_rank_world()[0]

    @property
    def world_size(self) -> int:
        return _dist_rank_world()[1]

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def write(self, text: str) -> None:
        """Print without breaking a progress bar."""
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)

    # --- building blocks (override to change) ---------------------------------------------
    def build_data(self):
        from dualssl.data.loaders import build_data

        return build_data(self.cfg.data)

    def wrap_loader(self, loader):
        return loader

    def build_model(self) -> nn.Module:
        from dualssl.models.factory import build_model

        return build_model(self.cfg.model)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def build_loss(self) -> nn.Module:
        from dualssl.losses.composite import DualSSLLoss

        return DualSSLLoss(self.cfg.loss, spacing=self.cfg.data.spacing)

    def configure_optimizers(self, model: nn.Module):
        opt = self.cfg.optim
        optimizer = torch.optim.Adam(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=opt.epochs, power=opt.poly_power)
        return optimizer, scheduler

    def setup(self) -> None:
        """Seed, then build data, model, loss, optimizer and AMP state (once)."""
        if self._is_setup:
            return
        seed_everything(self.cfg.optim.seed + self.rank)
        if self.cfg.optim.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = self.build_data()
        self.train_loader = self.wrap_loader(self.data.train_loader)
        self.net = self.build_model().to(self.device)
        self.model = self.wrap_model(self.net)
        self.criterion = self.build_loss().to(self.device)
        self.optimizer, self.scheduler = self.configure_optimizers(self.net)
        self.amp_dtype = amp_dtype(self.cfg.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._is_setup = True

    # --- one step, one epoch ----------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward, loss parts, backward and optimizer step on one batch of patches.

        Returns the detached loss parts as device tensors: reading them as floats here would
        synchronise the GPU four times a step, so ``train_epoch`` does it once an epoch."""
        loss_cfg = self.cfg.loss
        image = batch["image"].to(self.device, non_blocking=True).float()
        label = batch["label"].to(self.device, non_blocking=True)
        image_in, corrupt_mask = self.criterion.corrupt(image, label, probs=self.band_probs(image))
        with self.autocast():
            outputs = self.model(image_in, embeddings=loss_cfg.contrastive_on, restoration=loss_cfg.restoration_on)
        outputs = {k: v.float() for k, v in outputs.items() if v is not None}
        parts = self.criterion(outputs, label, image, corrupt_mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {("loss" if k == "loss" else f"loss_{k}"): v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def band_probs(self, image: torch.Tensor) -> torch.Tensor | None:
        """Softmax of a no-grad forward of the clean batch, only when ``loss.entropy_widen`` asks for it
        (high-entropy voxels then join the corruption band; costs one extra forward)."""
        if not (self.cfg.loss.restoration_on and self.cfg.loss.entropy_widen):
            return None
        with self.autocast():
            return torch.softmax(self.net(image)["logits"].float(), dim=1)

    def epoch_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """The training batches of one epoch; the data pipeline is reseeded per epoch so a resume
        at an epoch boundary replays exactly the same patches."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        dataset = getattr(self.train_loader, "dataset", None)
        transform = getattr(dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=(self.cfg.optim.seed * 1000 + epoch * 10 + self.rank) % 2**31)
        steps = self.cfg.optim.steps_per_epoch
        if steps <= 0:
            return iter(self.train_loader)
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.train_loader)), steps)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        start = time.perf_counter()
        for batch in self.epoch_batches(epoch):
            for key, value in self.train_step(batch).items():
                sums[key] = sums[key] + value if key in sums else value.double()
            n += 1
        if n == 0:
            raise RuntimeError("the training loader yielded no batch: check data.source_sites and the dataset")
        metrics = {k: float(v) / n for k, v in sums.items()}
        metrics["steps"] = float(n)
        metrics["epoch_time_s"] = time.perf_counter() - start
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics

    # --- validation -----------------------------------------------------------------------
    @torch.inference_mode()
    def validate_patches(self) -> float:
        """Cheap metric: global Dice of argmax over the fixed validation patches (all ranks share)."""
        self.net.eval()
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        loader = self.data.val_patch_loader
        for i, batch in enumerate(loader):
            if i % self.world_size != self.rank:
                continue
            image = batch["image"].to(self.device).float()
            label = batch["label"].to(self.device) > 0.5
            with self.autocast():
                logits = self.net(image)["logits"]
            pred = logits.argmax(1, keepdim=True) > 0
            stats[0] += 2 * (pred & label).sum()
            stats[1] += pred.sum() + label.sum()
        stats = _all_reduce_sum(stats)
        return float(stats[0] / stats[1]) if stats[1] > 0 else 1.0

    @torch.inference_mode()
    def validate_volumes(self) -> float:
        """Selection metric: mean whole-volume Dice (sliding window) over source validation cases."""
        from monai.metrics import compute_dice

        from dualssl.evaluation.inference import Predictor
        from dualssl.models import SegmentationNet

        predictor = Predictor(SegmentationNet(self.net), self.cfg, device=self.device)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(len(self.data.val_volumes)):
            if i % self.world_size != self.rank:
                continue
            item = self.data.val_volumes[i]
            pred = predictor.predict_volume(item["image"]).to(self.device)
            label = torch.as_tensor(item["label"]).to(self.device) > 0.5
            dice = compute_dice(torch.stack([~pred.bool(), pred.bool()], 1).float(),
                                torch.stack([~label, label], 1).float(), include_background=False,
                                ignore_empty=False)
            stats[0] += float(dice.flatten()[0])
            stats[1] += 1
        stats = _all_reduce_sum(stats)
        return float(stats[0] / stats[1]) if stats[1] > 0 else math.nan

    def validate(self, epoch: int) -> dict[str, float]:
        metrics = {"val_dice_patch": self.validate_patches()}
        last = epoch == self.cfg.optim.epochs - 1
        if (epoch + 1) % self.cfg.eval.val_every == 0 or last:
            metrics["val_dice"] = self.validate_volumes()
        elif self.history:
            metrics["val_dice"] = self.history[-1].get("val_dice", math.nan)
        else:
            metrics["val_dice"] = math.nan
        return metrics

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; tensors and plain Python only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": [dict(h) for h in self.history],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup()
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.history = [dict(h) for h in state["history"]]
        set_rng_state(state["rng"])

    def resume(self, source: str | Path | dict[str, Any]) -> None:
        state = source if isinstance(source, dict) else load_checkpoint(source, map_location="cpu")
        self.load_state_dict(state)

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> FitResult:
        self.setup()
        for cb in self.callbacks:
            cb.on_train_start(self)
        epochs = range(self.epoch, self.cfg.optim.epochs)
        if self.progress and self.is_main_process:
            from tqdm import tqdm

            epochs = tqdm(epochs, desc="train", unit="epoch", initial=self.epoch, total=self.cfg.optim.epochs,
                          file=sys.stdout, dynamic_ncols=True)
        selection = self.cfg.eval.selection_metric
        for epoch in epochs:
            metrics = {"epoch": float(epoch)}
            metrics.update(self.train_epoch(epoch))
            metrics.update(self.validate(epoch))
            self.scheduler.step()
            self.epoch = epoch + 1
            value = metrics.get(selection, math.nan)
            if not math.isnan(value) and value > self.best_metric:
                self.best_metric, self.best_epoch = value, epoch
            metrics[f"best_{selection}"] = self.best_metric
            self.history.append(metrics)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{metrics['loss']:.3f}", dice=f"{metrics.get('val_dice', math.nan):.3f}")
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics, self.state_dict)
        result = FitResult(self.best_metric, self.best_epoch, list(self.history))
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result


def fit(cfg: Config, *, callbacks: Sequence[Callback] = (), resume_from: str | Path | dict | None = None,
        out_dir: str | Path | None = None, trainer_cls: type[Trainer] = Trainer,
        device: torch.device | str | None = None) -> FitResult:
    """Train ``cfg`` (optionally resuming from a checkpoint path or state dict) and return the result."""
    trainer = trainer_cls(cfg, callbacks=callbacks, out_dir=out_dir, device=device)
    if resume_from is not None:
        trainer.resume(resume_from)
    return trainer.run()
