"""Configuration of a dualssl run: a tree of validated dataclasses.

The command line (``--set loss.tau=0.1``), the YAML search space of the study and the MLflow
parameters all speak the same dotted names, so a value is easy to follow from the command line
to the loss.

Conventions shared by the whole library:

* Volumes are channel-first tensors ``(C, X, Y, Z)`` (batched: ``(B, C, X, Y, Z)``) in RAS
  orientation after preprocessing; the last axis ``Z`` is the axial (slice) axis.
* ``data.spacing`` is the voxel size in mm, ordered like the axes ``(X, Y, Z)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

# Fields with a fixed set of values are typed with these Literals: ``Config.set`` refuses anything
# else and lists the allowed values; ``Config.validate`` checks them again after plain assignment.
DomainAug = Literal["none", "bigaug", "randconv", "gin"]
AmpMode = Literal["auto", "bf16", "fp16", "off"]
RecLoss = Literal["l1", "mse"]
ValidationMetric = Literal["val_dice", "val_dice_patch"]
OptimizerName = Literal["adam", "sgd"]

DOMAIN_AUGS: tuple[str, ...] = typing.get_args(DomainAug)
AMP_MODES: tuple[str, ...] = typing.get_args(AmpMode)
REC_LOSSES: tuple[str, ...] = typing.get_args(RecLoss)
VALIDATION_METRICS: tuple[str, ...] = typing.get_args(ValidationMetric)
"""The metrics ``Trainer.validate`` reports each epoch (``dualssl.engine.fit``): ``val_dice`` = Dice of
whole source-validation volumes, ``val_dice_patch`` = Dice on source-validation patches. Only these
can be ``eval.selection_metric`` or ``eval.cheap_metric``."""
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field and the fix."""


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}")


@dataclass
class DataConfig:
    """Where the cases are and how they become patches."""

    root: str = ""
    """Dataset root (MSD or nnU-Net raw layout) or a CSV/JSON list of (image, label, site)."""
    source_sites: list[str] = field(default_factory=lambda: ["pv_standard"])
    """Sites used for training and validation; every other site is a test site."""
    val_fraction: float = 0.25
    split_seed: int = 0
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    """Target voxel size in mm (X, Y, Z) after resampling."""
    hu_window: tuple[float, float] = (-100.0, 240.0)
    """HU range mapped to [0, 1]; values outside are clipped."""
    patch_size: tuple[int, int, int] = (96, 96, 64)
    pos_fraction: float = 0.67
    """Fraction of patches centred on pancreas voxels (the rest on background)."""
    samples_per_volume: int = 2
    batch_size: int = 2
    cache_dir: str = ""
    """On-disk cache of preprocessed volumes shared by concurrent trials ('' = <root>/.dualssl_cache);
    a subfolder per preprocessing hash. Put it on shared storage on multi-node clusters."""
    num_workers: int = 0
    augment: bool = True
    """Standard augmentation of the training patches: nnU-Net's default (rotation, scaling, noise, blur,
    brightness, contrast, low resolution, gamma, mirroring; ``transforms.standard_augmentation``)."""
    domain_aug: DomainAug = "none"
    """Domain-generalisation augmentation applied after the standard one: 'none', 'bigaug', 'randconv'
    or 'gin' (``dualssl/data/augment/``)."""

    def validate(self) -> None:
        _check(len(self.source_sites) >= 1, "data.source_sites", "name at least one source site")
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "must lie in (0, 1)")
        _check(len(self.spacing) == 3 and all(s > 0 for s in self.spacing),
               "data.spacing", "three positive voxel sizes in mm, e.g. 1.5,1.5,2.0")
        _check(len(self.hu_window) == 2 and self.hu_window[0] < self.hu_window[1],
               "data.hu_window", "(low, high) with low < high, e.g. -100,240")
        _check(len(self.patch_size) == 3 and all(int(p) >= 8 and int(p) % 8 == 0 for p in self.patch_size),
               "data.patch_size", "three sizes, each a multiple of 8 (the encoder downsamples by 8)")
        _check(0.0 <= self.pos_fraction <= 1.0, "data.pos_fraction", "must lie in [0, 1]")
        _check(self.samples_per_volume >= 1, "data.samples_per_volume", "must be >= 1")
        _check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.domain_aug in DOMAIN_AUGS, "data.domain_aug",
               f"{self.domain_aug!r} is not allowed; choose one of {', '.join(DOMAIN_AUGS)}")


@dataclass
class ModelConfig:
    """3D residual U-Net with a projection head (contrastive) and a restoration head."""

    in_channels: int = 1
    num_classes: int = 2
    """Output channels of the segmentation logits (2 = background/pancreas softmax)."""
    widths: tuple[int, ...] = (32, 64, 128, 256)
    """Encoder widths; len(widths) == 4 gives a bottleneck at 1/8 resolution."""
    norm_groups: int = 8
    last_dilation: int = 2
    dropout: float = 0.1
    embed_dim: int = 32
    """Channels of the L2-normalised projection embeddings on the bottleneck."""
    deep_supervision: bool = False
    """Also score segmentation logits at 1/2 and 1/4 resolution during training (nnU-Net's deep
    supervision: weights 1, 1/2, 1/4 normalised; labels downsampled nearest). Extra 1x1x1 heads
    train only; inference and export use the full-resolution head alone."""

    def validate(self) -> None:
        _check(isinstance(self.deep_supervision, bool), "model.deep_supervision",
               f"must be true or false, got {self.deep_supervision!r}")
        _check(self.in_channels >= 1, "model.in_channels", "must be >= 1")
        _check(self.num_classes >= 2, "model.num_classes", "must be >= 2 (softmax over background + classes)")
        _check(len(self.widths) == 4, "model.widths", "give four encoder widths, e.g. 8,16,32,64")
        _check(all(w > 0 and w % self.norm_groups == 0 for w in self.widths), "model.widths",
               f"every width must be a positive multiple of model.norm_groups={self.norm_groups}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must lie in [0, 1)")
        _check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1")


@dataclass
class LossConfig:
    """Total = Dice+CE + lambda_con * L_con + lambda_rec * L_rec."""

    lambda_con: float = 0.1
    lambda_rec: float = 0.1
    tau: float = 0.05
    """Temperature of the supervised NT-Xent."""
    corruption_ratio: float = 0.5
    """r: fraction of the uncertainty band's voxels whose appearance is corrupted."""
    band_mm: float = 4.0
    """Half-width in mm of the boundary band (dilate minus erode of the label)."""
    entropy_widen: bool = False
    """Widen the band with voxels where the current prediction's entropy is high."""
    entropy_threshold: float = 0.5
    """Normalised entropy (0..1, entropy / log K) above which a voxel joins the band."""
    rec_loss: RecLoss = "l1"
    """'l1' or 'mse' on the corrupted voxels."""
    rec_crop: float = 0.5
    """Side of the restoration forward's crop (the corrupted input, centred on a random band voxel)
    as a fraction of the patch side per axis, rounded to a multiple of 8; 1.0 = the whole patch.
    0.5 (1/8 of the voxels) adds ~1/8 of a forward+backward to a step (benchmarks/step_cost.py measures it)."""
    ring_kernel: tuple[int, int] = (10, 20)
    """Range of k (voxels, full resolution) of the k x k x (k-3) dilation giving the negative ring."""
    min_pos_voxels: int = 10
    """An axial slice gives a positive when it holds this many pancreas cells on the 1/8 bottleneck grid."""
    min_neg_voxels: int = 5
    """An axial slice gives a negative when it holds this many ring cells on the 1/8 bottleneck grid."""

    @property
    def contrastive_on(self) -> bool:
        return self.lambda_con > 0

    @property
    def restoration_on(self) -> bool:
        return self.lambda_rec > 0

    def validate(self) -> None:
        _check(self.lambda_con >= 0, "loss.lambda_con", "must be >= 0 (0 switches the contrastive branch off)")
        _check(self.lambda_rec >= 0, "loss.lambda_rec", "must be >= 0 (0 switches the restoration branch off)")
        _check(self.tau > 0, "loss.tau", "the temperature must be > 0, e.g. 0.05")
        _check(0.0 <= self.corruption_ratio <= 1.0, "loss.corruption_ratio", "must lie in [0, 1]")
        _check(self.band_mm > 0, "loss.band_mm", "must be > 0 mm")
        _check(self.rec_loss in ("l1", "mse"), "loss.rec_loss", "choose 'l1' or 'mse'")
        _check(0.0 < self.rec_crop <= 1.0, "loss.rec_crop",
               "a fraction of the patch side in (0, 1], e.g. 0.5 (1.0 = the whole patch)")
        _check(len(self.ring_kernel) == 2 and 4 <= self.ring_kernel[0] <= self.ring_kernel[1],
               "loss.ring_kernel", "(k_min, k_max) with 4 <= k_min <= k_max")
        _check(0.0 <= self.entropy_threshold <= 1.0, "loss.entropy_threshold",
               "a normalised entropy in [0, 1], e.g. 0.5")
        _check(self.min_pos_voxels >= 0, "loss.min_pos_voxels", "must be >= 0")
        _check(self.min_neg_voxels >= 0, "loss.min_neg_voxels", "must be >= 0")


@dataclass
class OptimConfig:
    """Adam (or nnU-Net's SGD with Nesterov momentum) with poly learning-rate decay; AMP on CUDA."""

    optimizer: OptimizerName = "adam"
    """'adam' (L2 ``weight_decay``) or 'sgd' (Nesterov, ``momentum``; nnU-Net v2's: lr 1e-2, momentum
    0.99, weight decay 3e-5)."""
    momentum: float = 0.99
    """SGD's Nesterov momentum (unused by Adam)."""
    lr: float = 1e-4
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    epochs: int = 150
    steps_per_epoch: int = 0
    """0 = one pass over the training loader per epoch."""
    amp: AmpMode = "auto"
    """'auto' (bf16 on CUDA if supported, else fp16; off on CPU), 'bf16', 'fp16' or 'off'."""
    grad_clip: float = 12.0
    seed: int = 2022
    deterministic: bool = False
    max_nonfinite_steps: int = 5
    """A step whose loss (any part) or gradient is not finite is skipped (no weight change) and
    counted; this many in a row stop the run with an error naming the epoch and the part."""
    compile: bool = False
    """Run the training forwards through ``torch.compile`` of the model (validation, checkpoints and
    export keep the eager module, which shares its weights). Needs a C/C++ compiler for the CPU
    backend; the first steps pay the compilation (``benchmarks/step_cost.py --compile`` measures it)."""

    def validate(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", f"choose one of {', '.join(OPTIMIZERS)}, "
               f"got {self.optimizer!r}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", "must lie in [0, 1)")
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.poly_power >= 0, "optim.poly_power", "must be >= 0")
        _check(self.epochs >= 1, "optim.epochs", "must be >= 1")
        _check(self.steps_per_epoch >= 0, "optim.steps_per_epoch", "must be >= 0 (0 = one loader pass)")
        _check(self.amp in ("auto", "bf16", "fp16", "off"), "optim.amp", "choose auto, bf16, fp16 or off")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
        _check(self.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps",
               "must be >= 1 (consecutive non-finite steps tolerated before the run stops)")
        _check(isinstance(self.compile, bool), "optim.compile", f"must be true or false, got {self.compile!r}")


@dataclass
class EvalConfig:
    """Validation during training and whole-volume evaluation."""

    val_every: int = 1
    sw_batch_size: int = 2
    sw_overlap: float = 0.25
    tta_flips: bool = False
    keep_largest: bool = True
    cheap_metric: ValidationMetric = "val_dice_patch"
    """Per-epoch metric for early stopping (ASHA): Dice on validation patches (one of ``VALIDATION_METRICS``)."""
    selection_metric: ValidationMetric = "val_dice"
    """Metric for choosing the best checkpoint: whole-volume Dice on source validation cases
    (one of ``VALIDATION_METRICS``)."""

    def validate(self) -> None:
        _check(self.val_every >= 1, "eval.val_every", "must be >= 1")
        _check(self.sw_batch_size >= 1, "eval.sw_batch_size", "must be >= 1")
        _check(0.0 <= self.sw_overlap < 1.0, "eval.sw_overlap", "must lie in [0, 1)")
        for name in ("cheap_metric", "selection_metric"):
            value = getattr(self, name)
            _check(value in VALIDATION_METRICS, f"eval.{name}",
                   f"{value!r} is not a metric the trainer reports; choose one of {', '.join(VALIDATION_METRICS)}")


@dataclass
class Config:
    """The whole run; every leaf has a dotted name such as ``loss.tau``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        """Check every section, every fixed-choice field, and what the sections must agree on."""
        for f in fields(self):
            section = getattr(self, f.name)
            _check_choices(section, f.name)
            section.validate()
        _check(self.model.num_classes == 2, "model.num_classes",
               f"{self.model.num_classes} classes cannot be trained: the data layer merges every label into "
               f"{{0, 1}} (MSD tumour 2 -> pancreas 1), so only background/pancreas exist; set model.num_classes=2")
        return self

    # --- conversions -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists for tuples): JSON/YAML and checkpoint safe."""
        return json.loads(json.dumps(asdict(self)))

    def flat(self) -> dict[str, Any]:
        """Dotted names -> values, e.g. ``{"loss.tau": 0.05, ...}`` (MLflow params)."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def hash(self) -> str:
        """Short stable hash of the whole config (an MLflow tag)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> "Config":
        """Build from a nested dict; unknown sections or keys are errors naming the field."""
        cfg = cls()
        for section, values in (tree or {}).items():
            if section not in {f.name for f in fields(cls)}:
                raise ConfigError(f"{section}: unknown config section; known: "
                                  f"{', '.join(f.name for f in fields(cls))}")
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of fields, got {type(values).__name__}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Read a YAML or JSON config file."""
        import yaml  # lazy: the GPU check imports the config on machines without PyYAML

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON ({exc})") from exc
        return cls.from_dict(tree or {})

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def set(self, dotted: str, value: Any) -> None:
        """Set one leaf by dotted name; strings are parsed to the field's type."""
        section_name, _, key = dotted.partition(".")
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section) or not key:
            raise ConfigError(f"{dotted}: unknown config field; use section.field, e.g. loss.tau")
        names = {f.name: f for f in fields(section)}
        if key not in names:
            raise ConfigError(f"{dotted}: unknown field; {section_name} has: {', '.join(names)}")
        hints = typing.get_type_hints(type(section))
        setattr(section, key, _coerce(hints[key], value, dotted))

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "Config":
        """Apply ``["loss.tau=0.1", ...]`` or ``{"loss.tau": 0.1}``; returns self."""
        items = overrides.items() if isinstance(overrides, dict) else [_split_kv(o) for o in overrides]
        for key, value in items:
            self.set(key, value)
        return self


def _split_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{text}: expected key=value, e.g. loss.tau=0.1")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _check_choices(section: Any, prefix: str) -> None:
    """Every ``Literal``-typed field of ``section`` holds one of its allowed values."""
    for key, hint in typing.get_type_hints(type(section)).items():
        if typing.get_origin(hint) is Literal:
            value, allowed = getattr(section, key), typing.get_args(hint)
            _check(value in allowed, f"{prefix}.{key}",
                   f"{value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """``value`` as the field's type, without rounding or guessing; errors name the field.

    ``int``: whole numbers only (``3``, ``3.0``, ``"3"``); ``1.5``, ``"1.5"`` and booleans are errors.
    ``bool``: ``True``/``False``, the integers 0/1 and the strings true/false, yes/no, on/off, 1/0;
    any other number (``2``, ``1.0``) is an error. ``float``: finite numbers (not booleans).
    ``str``: strings (and paths) only. ``Literal[...]``: one of the listed strings. Tuples and lists
    accept a sequence or a comma-separated string (``"1.5,1.5,2"``).
    """
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.replace("(", "").replace(")", "").replace("[", "")
                     .replace("]", "").split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of values, got {value!r}; write e.g. {name}=a,b")
        args = typing.get_args(hint)
        elem = args[0] if args else str
        items = [_coerce(elem, v, name) for v in value]
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, str) and value.strip() in allowed:
            return value.strip()
        hint_yaml = " (unquoted on/off/yes/no in YAML are booleans: quote the value)" \
            if isinstance(value, bool) else ""
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of "
                          f"{', '.join(map(str, allowed))}{hint_yaml}")
    if hint is bool:
        return _to_bool(value, name)
    if hint is int:
        return _to_int(value, name)
    if hint is float:
        return _to_float(value, name)
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value) if isinstance(value, os.PathLike) else value
        raise ConfigError(f"{name}: expected text, got {type(value).__name__} {value!r}; quote it")
    return value


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":  # numpy bool too
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: cannot read {value!r} as a boolean; use true or false (or 1/0)")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a whole number, got the boolean {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    number: float | None = None
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if number is not None and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{name}: cannot read {value!r} as a whole number (int); values are never rounded, "
                      f"give e.g. {name}=3")


def _to_float(value: Any, name: str) -> float:
    number: float | None = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise ConfigError(f"{name}: cannot read {value!r} as a number (float); give e.g. {name}=0.1")
    if not math.isfinite(number):
        raise ConfigError(f"{name}: {value!r} is not a finite number")
    return number
