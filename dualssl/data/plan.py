"""``--plan auto``: target spacing, HU window and patch size from the source site's fingerprint.

The rule (in the spirit of nnU-Net v2's ``ExperimentPlanner``; every step is printed with its numbers):

1. **Spacing.** The median over the source cases of each RAS axis's spacing. If the largest median
   is more than :data:`ANISOTROPY_RATIO` (3) times the smallest, the data are anisotropic: the
   low-resolution axis (largest median) takes the 10th percentile of its spacings over the cases
   instead (resampling a few thick-slice cases up, rather than most thin-slice cases down), but
   never less than the largest other axis (nnU-Net: the low-res axis stays the coarsest).
2. **HU window.** The 0.5th and 99.5th percentiles of the source site's foreground (label) voxels,
   pooled with the same number of samples per case (:mod:`dualssl.data.fingerprint`), rounded to
   whole HU. This is nnU-Net's CT clipping range; we map it to [0, 1] as ``data.hu_window``.
3. **Patch size.** Start from the median image extent at the target spacing (median over cases of
   ``shape * spacing / target``, rounded to whole voxels), each axis rounded down to a multiple of 8 and capped at
   :data:`MAX_PATCH`; while the estimated training memory (:func:`estimated_memory_gb`) exceeds the
   budget per device, take 8 voxels off the axis with the largest extent in mm (ties: the later axis).
   Each axis stays >= :data:`MIN_PATCH`; if even that does not fit, the plan fails naming the budget.

The memory estimate is a model, not a measurement: fp32 activations kept for the backward pass,
:data:`ACTIVATIONS_PER_LEVEL` tensors of the level's width per voxel at each U-Net level (two
convolutions with norm and activation in the encoder and in the decoder, plus the skip), times the
patches in a batch (``batch_size x samples_per_volume``), times 1.5 when the restoration branch
runs its second forward pass, plus the parameters with Adam's two moments. Checked once, on CPU
(fp32 autograd, peak RSS growth of one forward and backward): patch 48 x 48 x 32, 4 patches, widths
32-256, no restoration: 0.68 GB measured, 0.74 GB estimated. Not calibrated on a GPU (cuDNN workspaces,
the allocator's cache and mixed precision move it either way): give ``--plan-memory-gb`` with a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dualssl.config import Config
from dualssl.data.datalist import DatasetError
from dualssl.data.fingerprint import CaseFingerprint

ANISOTROPY_RATIO = 3.0
LOWRES_PERCENTILE = 10.0
FOREGROUND_PERCENTILES = (0.5, 99.5)
MAX_PATCH = 256
MIN_PATCH = 16
ACTIVATIONS_PER_LEVEL = 14
DEFAULT_MEMORY_GB = 8.0
"""Budget per device when none is given: nnU-Net's target of about 8 GB of GPU memory."""


@dataclass
class DataPlan:
    """What ``--plan auto`` chose, and why (one sentence per decision)."""

    source_sites: list[str]
    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    patch_size: tuple[int, int, int]
    memory_gb: float
    estimated_gb: float
    reasons: list[str] = field(default_factory=list)

    def apply(self, cfg: Config) -> Config:
        """Set ``data.spacing``, ``data.hu_window`` and ``data.patch_size`` (validated)."""
        cfg.data.spacing = tuple(self.spacing)
        cfg.data.hu_window = tuple(self.hu_window)
        cfg.data.patch_size = tuple(self.patch_size)
        return cfg.validate()

    def params(self) -> dict[str, str]:
        """MLflow params (dotted names under ``plan.``)."""
        return {"plan.rule": "auto", "plan.source_sites": ",".join(self.source_sites),
                "plan.spacing": ",".join(f"{s:g}" for s in self.spacing),
                "plan.hu_window": ",".join(f"{v:g}" for v in self.hu_window),
                "plan.patch_size": ",".join(str(p) for p in self.patch_size),
                "plan.memory_gb": f"{self.memory_gb:g}", "plan.estimated_gb": f"{self.estimated_gb:.2f}"}

    def to_json(self) -> dict[str, Any]:
        return {"rule": "auto", "source_sites": self.source_sites, "spacing": list(self.spacing),
                "hu_window": list(self.hu_window), "patch_size": list(self.patch_size),
                "memory_gb": self.memory_gb, "estimated_gb": self.estimated_gb, "reasons": self.reasons}

    def describe(self) -> str:
        return "\n".join(f"  {r}" for r in self.reasons)


def plan_spacing(spacings: np.ndarray) -> tuple[tuple[float, float, float], str]:
    """Rule 1 on an ``(N, 3)`` array of per-case RAS spacings -> (target, explanation)."""
    median = np.median(spacings, axis=0)
    ratio = float(median.max() / median.min())
    if ratio <= ANISOTROPY_RATIO:
        return (tuple(round(float(s), 4) for s in median),  # type: ignore[return-value]
                f"spacing {_fmt(median)} mm: the median per axis (max/min {ratio:.2f} <= {ANISOTROPY_RATIO:g})")
    axis = int(np.argmax(median))
    low = float(np.percentile(spacings[:, axis], LOWRES_PERCENTILE))
    others = max(float(median[a]) for a in range(3) if a != axis)
    target = median.copy()
    target[axis] = max(low, others)
    clamp = f" (raised to the largest other axis {others:g})" if low < others else ""
    return (tuple(round(float(s), 4) for s in target),  # type: ignore[return-value]
            f"spacing {_fmt(target)} mm: median {_fmt(median)} is anisotropic (max/min {ratio:.2f} > "
            f"{ANISOTROPY_RATIO:g}), so axis {'XYZ'[axis]} takes the {LOWRES_PERCENTILE:g}th percentile of its "
            f"spacings, {low:g} mm{clamp}")


def plan_window(samples: np.ndarray) -> tuple[tuple[float, float], str]:
    """Rule 2 on the pooled foreground samples (HU)."""
    if samples.size == 0:
        raise DatasetError("--plan auto: the source site has no labelled voxel, so there is no foreground "
                           "intensity to plan the HU window from; check the labels or set data.hu_window")
    low, high = (float(round(v)) for v in np.percentile(samples, FOREGROUND_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return (low, high), (f"HU window [{low:g}, {high:g}]: the {FOREGROUND_PERCENTILES[0]:g}th and "
                         f"{FOREGROUND_PERCENTILES[1]:g}th percentiles of {samples.size} foreground voxels "
                         "sampled evenly over the source cases")


def estimated_memory_gb(patch: Sequence[int], cfg: Config) -> float:
    """Training memory of one device for ``patch`` (the model in the module docstring), in GB."""
    voxels = float(np.prod([int(p) for p in patch]))
    widths = [int(w) for w in cfg.model.widths]
    per_voxel = sum(ACTIVATIONS_PER_LEVEL * w / 8 ** level for level, w in enumerate(widths))
    patches = cfg.data.batch_size * cfg.data.samples_per_volume
    restoration = 1.5 if cfg.loss.lambda_rec > 0 else 1.0
    activations = 4.0 * voxels * per_voxel * patches * restoration
    params = sum(27 * w_in * w_out for w_in, w_out in zip([cfg.model.in_channels, *widths], widths)) * 2
    return (activations + 16.0 * params) / 1e9


def plan_patch(extent: np.ndarray, spacing: Sequence[float], cfg: Config,
               memory_gb: float) -> tuple[tuple[int, int, int], float, str]:
    """Rule 3: ``extent`` = median image size in voxels at the target spacing."""
    patch = [int(min(MAX_PATCH, max(MIN_PATCH, math.floor(e / 8) * 8))) for e in extent]
    start = list(patch)
    while estimated_memory_gb(patch, cfg) > memory_gb:
        mm = [p * s if p - 8 >= MIN_PATCH else -1.0 for p, s in zip(patch, spacing)]
        if max(mm) < 0:
            raise DatasetError(f"--plan auto: even a {MIN_PATCH}^3 patch needs "
                               f"{estimated_memory_gb(patch, cfg):.1f} GB, above the budget of {memory_gb:g} GB "
                               "per device; raise --plan-memory-gb or lower data.batch_size / model.widths")
        axis = max(range(3), key=lambda a: (mm[a], a))
        patch[axis] -= 8
    est = estimated_memory_gb(patch, cfg)
    why = (f"patch {tuple(patch)}: from the median image size {tuple(int(e) for e in extent)} voxels at that "
           f"spacing (start {tuple(start)}, multiples of 8, at most {MAX_PATCH}), shrunk along the longest axis "
           f"in mm until the estimated {est:.2f} GB fits {memory_gb:g} GB per device "
           f"({cfg.data.batch_size * cfg.data.samples_per_volume} patches a step, widths {tuple(cfg.model.widths)})")
    return tuple(patch), est, why  # type: ignore[return-value]


def plan_from_fingerprint(rows: Sequence[CaseFingerprint], cfg: Config,
                          memory_gb: float = DEFAULT_MEMORY_GB) -> DataPlan:
    """The plan for ``cfg.data.source_sites`` from the per-case fingerprint ``rows`` (any sites;
    only the source sites' cases are used). ``cfg`` supplies the batch and model the patch must fit."""
    sources = list(cfg.data.source_sites)
    mine = [r for r in rows if r.site in sources]
    if not mine:
        raise DatasetError(f"--plan auto: no case of the source site(s) {', '.join(sources)} in the fingerprint")
    spacings = np.asarray([r.spacing for r in mine], dtype=np.float64)
    spacing, why_spacing = plan_spacing(spacings)
    samples = np.concatenate([np.asarray(r.label_sample, dtype=np.float64) for r in mine])
    window, why_window = plan_window(samples)
    extents = np.asarray([[n * s for n, s in zip(r.shape, r.spacing)] for r in mine], dtype=np.float64)
    extent = np.round(np.median(extents, axis=0) / np.asarray(spacing))  # 512 x 0.859375 / 0.8594 -> 512
    patch, est, why_patch = plan_patch(extent, spacing, cfg, memory_gb)
    head = f"planned from {len(mine)} case(s) of {', '.join(sources)}:"
    return DataPlan(sources, spacing, window, patch, memory_gb, est, [head, why_spacing, why_window, why_patch])


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def plans_per_source(rows: Sequence[Any], cfg: Config, source_sets: Sequence[Sequence[str]],
                     memory_gb: float = DEFAULT_MEMORY_GB) -> dict[str, DataPlan]:
    """One plan per distinct source-site set, each from that set's own cases (nnU-Net plans a dataset
    from the cases it trains on: a leave-one-site-out study trains on each site in turn).

    Returns ``{",".join(sources): plan}`` in the order first met; ``cfg`` is not changed.
    """
    out: dict[str, DataPlan] = {}
    for sources in source_sets:
        key = ",".join(sources)
        if key not in out:
            planning = Config.from_dict(cfg.to_dict())
            planning.data.source_sites = list(sources)
            out[key] = plan_from_fingerprint(rows, planning, memory_gb=memory_gb)
    return out
