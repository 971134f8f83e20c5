"""The training loop: small overridable steps, callbacks for reporting and checkpointing.

``Trainer`` knows nothing of Ray. The Ray study subclasses it to wrap the model and loaders for DDP
(``wrap_model``, ``wrap_loader``) and passes callbacks that report to Ray Train; ``dualssl train``
and the tests run the very same loop.

One epoch::

    for batch in loader:                      # (B, 1, *patch) image and label
        outputs = model(image, embeddings=...)             # CLEAN patch: segmentation + contrastive
        corrupted = loss.corrupt(image, label)             # crop around the band (None when off)
        rec_outputs = model(corrupted.image, restoration=True)   # restoration loss only
        parts = loss(outputs, label, rec_outputs, corrupted)     # loss, seg, con, rec
        backward, clip, step (skipped, and counted, when not finite)
    validate: cheap patch Dice every epoch, whole-volume Dice every eval.val_every epochs (NaN between)
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
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from dualssl.config import VALIDATION_METRICS, Config
from dualssl.engine.callbacks import Callback
from dualssl.engine.checkpoint import (CHECKPOINT_FORMAT, derive_seed, gather_rng_states, load_checkpoint,
                                       restore_rank_rng)
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


def _epoch_passes(loader: Any, epoch: int, seed: int, steps: int) -> Iterator[dict[str, Any]]:
    """``steps`` batches (one pass when ``steps <= 0``), passing over ``loader`` as often as needed.

    Before each pass the dataset and the sampler are keyed by ``(seed, epoch, pass)``, so a second
    pass in the same epoch gets new patches and a new order, and every pass is the same on a resume."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    done = 0
    for pass_index in itertools.count():
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch, seed=seed, pass_index=pass_index)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: order = f(sampler seed + this)
            sampler.set_epoch((epoch << 20) + pass_index)
        yielded = False
        for batch in loader:
            yield batch
            yielded, done = True, done + 1
            if 0 < steps <= done:
                return
        if steps <= 0 or not yielded:
            return


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
    _nonfinite_run: int = 0  # non-finite steps in a row (see optimizer_step, optim.max_nonfinite_steps)
    last_nonfinite: str = ""  # the non-finite parts of the latest skipped step

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
        self._rng_snapshot: tuple[int, list[dict[str, Any]]] | None = None  # (epoch, RNG state by rank)
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
        from dualssl.engine.optim import build_optimizer

        return build_optimizer(self.cfg.optim, model.parameters())

    def setup(self) -> None:
        """Seed, then build data, model (``torch.compile``d for training with ``optim.compile``), loss,
        optimizer and AMP state (once)."""
        if self._is_setup:
            return
        seed_everything(self.cfg.optim.seed + self.rank)
        if self.cfg.optim.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = self.build_data()
        self.train_loader = self.wrap_loader(self.data.train_loader)
        self.net = self.build_model().to(self.device)
        self.model = self.wrap_model(self.net)
        if self.cfg.optim.compile:
            # The training forwards run compiled; self.net (same parameters) stays the eager module
            # that state_dict, validation and export use. Static shapes: a run sees two input sizes
            # (the patch and the restoration crop), each gets its own graph.
            self.model = torch.compile(self.model, dynamic=False)
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
        """One batch of patches: forward of the CLEAN patch (segmentation and contrastive losses),
        forward of the corrupted crop (restoration loss only), then ``optimizer_step``.

        The band the restoration branch corrupts comes from the ground-truth label, so no loss
        but restoration ever sees the corrupted input (no label shortcut; ``dualssl.losses.composite``).

        Returns detached tensors: the loss parts ``loss, loss_seg, loss_con, loss_rec`` (device);
        the branches' sample counts ``con_pos, con_neg`` (contrastive cells), ``rec_changed``
        (voxels the corruption changed) and ``rec_region`` (band voxels in the crops); and
        ``finite`` (CPU, 1 = the optimizer stepped, 0 = skipped as non-finite). Loss parts stay on
        the device: ``train_epoch`` reads them once an epoch.
        """
        loss_cfg = self.cfg.loss
        image = batch["image"].to(self.device, non_blocking=True).float()
        label = batch["label"].to(self.device, non_blocking=True)
        with self.autocast():
            outputs = self.model(image, embeddings=loss_cfg.contrastive_on,
                                 deep_supervision=self.cfg.model.deep_supervision)
        outputs = {k: v.float() for k, v in outputs.items() if v is not None}
        corrupted = self.criterion.corrupt(image, label, probs=self.band_probs(outputs))
        rec_outputs = None
        if corrupted is not None:
            with self.autocast():
                rec_outputs = self.model(corrupted.image, restoration=True)
            rec_outputs = {k: v.float() for k, v in rec_outputs.items() if v is not None}
        parts = self.criterion(outputs, label, rec_outputs, corrupted)
        stepped = self.optimizer_step(parts)
        out = {("loss" if k == "loss" else f"loss_{k}"): v.detach() for k, v in parts.items()}
        pos, neg = self.criterion.last_counts
        # counts are device tensors (no host sync) or, with the reference sampling, Python ints
        out["con_pos"], out["con_neg"] = (torch.as_tensor(v, device=self.device).float() for v in (pos, neg))
        zero = torch.zeros((), device=self.device)
        out["rec_changed"] = corrupted.changed_voxels.sum() if corrupted is not None else zero
        out["rec_region"] = corrupted.region_voxels.sum() if corrupted is not None else zero
        out["finite"] = torch.tensor(float(stepped))
        return out

    def optimizer_step(self, parts: dict[str, torch.Tensor]) -> bool:
        """Backward, clip and step; returns False (and changes no weight, no optimizer state) when a
        loss part, or the gradient norm, is not finite. All ranks take the same decision.

        With fp16 loss scaling an overflowing gradient is GradScaler's business (it skips that step
        and lowers the scale, as usual) and is not counted here. Reading the flag is this step's one
        host sync, on purpose: a skipped step must leave Adam's moments alone, which zeroing the
        gradients on the device (``torch.where``) would not, and it is read only once backward and
        clipping are queued, so the GPU idles just for the optimizer's launch.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        scaled = self.scaler.is_enabled()
        if scaled:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.net.parameters() if p.grad is not None])
        finite = torch.isfinite(torch.stack([v.detach().float() for v in parts.values()])).all()
        if not scaled:
            finite = finite & torch.isfinite(norm)
        bad = _all_reduce_sum((~finite).to(torch.float32).reshape(1))
        if float(bad) == 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return True
        if scaled:
            self.scaler.update()  # unscale_ recorded the inf checks; found_inf lowers the scale
        self.optimizer.zero_grad(set_to_none=True)
        named = [f"loss{'' if k == 'loss' else '_' + k}={float(v.detach()):.4g}" for k, v in parts.items()
                 if not math.isfinite(float(v.detach()))]
        if not math.isfinite(float(norm)):
            named.append(f"gradient norm={float(norm):.4g}")
        self.last_nonfinite = ", ".join(named) or "a part on another rank"
        return False

    @torch.no_grad()
    def band_probs(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Softmax of the clean forward's detached logits ``(B, K, X, Y, Z)``, only when
        ``loss.entropy_widen`` asks for it (high-entropy voxels then join the corruption band)."""
        if not (self.cfg.loss.restoration_on and self.cfg.loss.entropy_widen):
            return None
        return torch.softmax(outputs["logits"].detach().float(), dim=1)

    def epoch_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """The training batches of one epoch, a function of ``(optim.seed, epoch, rank)`` only.

        The loader's generator (shuffle of a plain loader, workers' base seeds) is reseeded from
        ``(seed, epoch, rank)``; the dataset's patches and a DistributedSampler's order are keyed by
        ``(seed, epoch, pass)`` (see :func:`_epoch_passes`), so a resume replays the same batches
        with any ``data.num_workers``."""
        seed = self.cfg.optim.seed
        generator = getattr(self.train_loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(derive_seed(seed, epoch, self.rank))
        return _epoch_passes(self.train_loader, epoch, seed, self.cfg.optim.steps_per_epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; metrics: means of the loss parts over the steps taken, ``nonfinite_steps``
        (skipped), ``con_pos``/``con_neg`` (contrastive samples per step), ``rec_ratio`` (changed
        voxels / band voxels over the epoch, the realised corruption ratio), ``steps``, time, lr.

        Raises ``FloatingPointError`` after ``optim.max_nonfinite_steps`` non-finite steps in a row."""
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        n = skipped = 0
        start = time.perf_counter()
        limit = self.cfg.optim.max_nonfinite_steps
        for batch in self.epoch_batches(epoch):
            out = self.train_step(batch)
            n += 1
            if not bool(out.pop("finite", True)):
                skipped += 1
                self._nonfinite_run += 1
                if self._nonfinite_run >= limit:
                    raise FloatingPointError(
                        f"epoch {epoch}, step {n - 1}: {self._nonfinite_run} training steps in a row were not "
                        f"finite (last: {self.last_nonfinite}); they were skipped, so the weights are those "
                        f"before them. Check the inputs for NaN/inf, lower optim.lr or set optim.grad_clip, "
                        f"or raise optim.max_nonfinite_steps (now {limit})")
                continue
            self._nonfinite_run = 0
            for key, value in out.items():
                sums[key] = sums[key] + value if key in sums else value.double()
        if n == 0:
            raise RuntimeError("the training loader yielded no batch: check data.source_sites and the dataset")
        taken = n - skipped
        changed, region = (float(sums.pop(k, 0.0)) for k in ("rec_changed", "rec_region"))
        metrics = {k: float(v) / taken for k, v in sums.items()}
        if taken == 0:
            metrics.update({k: math.nan for k in ("loss", "loss_seg", "loss_con", "loss_rec")})
        metrics["rec_ratio"] = changed / region if region > 0 else (math.nan if self.cfg.loss.restoration_on else 0.0)
        metrics["nonfinite_steps"] = float(skipped)
        metrics["steps"] = float(n)
        metrics["train_time_s"] = time.perf_counter() - start
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return metrics

    # --- validation -----------------------------------------------------------------------
    @torch.inference_mode()
    def validate_patches(self) -> float:
        """Cheap metric: global Dice of argmax over the fixed validation patches (all ranks share);
        NaN when neither the predictions nor the labels hold any foreground."""
        from dualssl.evaluation.inference import pad_single_batch

        self.net.eval()
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        loader = self.data.val_patch_loader
        for i, batch in enumerate(loader):
            if i % self.world_size != self.rank:
                continue
            image = batch["image"].to(self.device).float()
            label = batch["label"].to(self.device) > 0.5
            with self.autocast():
                logits = self.net(pad_single_batch(image))["logits"][: image.shape[0]]
            pred = logits.argmax(1, keepdim=True) > 0
            stats[0] += 2 * (pred & label).sum()
            stats[1] += pred.sum() + label.sum()
        stats = _all_reduce_sum(stats)
        # No foreground in prediction nor label: Dice is undefined (NaN), not a perfect 1.
        return float(stats[0] / stats[1]) if stats[1] > 0 else math.nan

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
        """``val_dice_patch`` every epoch; ``val_dice`` (whole volumes) every ``eval.val_every`` epochs
        and at the last, NaN in the others (never last epoch's value); ``val_measured`` 1/0 says which."""
        metrics = {"val_dice_patch": self.validate_patches()}
        last = epoch == self.cfg.optim.epochs - 1
        measured = (epoch + 1) % self.cfg.eval.val_every == 0 or last
        metrics["val_dice"] = self.validate_volumes() if measured else math.nan
        metrics["val_measured"] = float(measured)
        assert set(VALIDATION_METRICS) <= set(metrics), "config.VALIDATION_METRICS lists what validate() reports"
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
            "rng": self._rng_states(),
        }

    def capture_rng_states(self) -> None:
        """Gather every rank's RNG state for the checkpoint of the epoch just ended.

        A collective: every rank calls it (``run`` does, before the epoch's callbacks), because
        ``state_dict`` runs on rank 0 alone."""
        self._rng_snapshot = (self.epoch, gather_rng_states())

    def _rng_states(self) -> list[dict[str, Any]]:
        if self._rng_snapshot is not None and self._rng_snapshot[0] == self.epoch:
            return self._rng_snapshot[1]
        if self.world_size > 1:
            raise RuntimeError("state_dict under DDP needs every rank's RNG state: call capture_rng_states() "
                               "on every rank first (Trainer.run does so at the end of each epoch)")
        return gather_rng_states()

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
        # This rank's own RNG state (the corruptions and contrastive samples differ per rank).
        restore_rank_rng(state["rng"], self.rank,
                         fallback_seed=derive_seed(self.cfg.optim.seed, self.epoch, self.rank))

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
            # Where an epoch's time goes (studies/throughput.py): time.time() stamps compare across
            # processes; callback_time_s (checkpointing, reporting) is added to this epoch's row after
            # its callbacks ran, so a checkpoint holds it for every epoch but its own.
            metrics = {"epoch": float(epoch), "epoch_start_unix": time.time()}
            metrics.update(self.train_epoch(epoch))
            start = time.perf_counter()
            metrics.update(self.validate(epoch))
            metrics["val_time_s"] = time.perf_counter() - start
            self.scheduler.step()
            self.epoch = epoch + 1
            value = metrics.get(selection, math.nan)
            # only measured epochs compete: unmeasured ones carry NaN (validate), which never wins
            if not math.isnan(value) and value > self.best_metric:
                self.best_metric, self.best_epoch = value, epoch
            metrics[f"best_{selection}"] = self.best_metric
            self.history.append(metrics)
            self.capture_rng_states()  # a collective: state_dict runs on rank 0 only
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(loss=f"{metrics['loss']:.3f}", dice=f"{metrics.get('val_dice', math.nan):.3f}")
            start = time.perf_counter()
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, metrics, self.state_dict)
            metrics["callback_time_s"] = time.perf_counter() - start
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
