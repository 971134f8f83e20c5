"""MONAI dictionary pipelines: deterministic preprocessing (cacheable), random patches, inference.

Preprocessing (:func:`preprocess_transforms`, also the invertible core of
:func:`inference_transforms`):

    load (nibabel, channel-first, meta kept) -> input checks -> merge labels to {0,1}
    -> orientation RAS -> resample to ``cfg.spacing`` (image bilinear, label nearest)
    -> crop to the body (HU > ``BODY_HU`` plus ``CROP_MARGIN`` voxels)
    -> HU window ``cfg.hu_window`` scaled to [0, 1] with clipping.

Outputs ``image`` ``(1, X, Y, Z)`` float32 in [0, 1] and ``label`` ``(1, X, Y, Z)`` uint8 in {0, 1},
both ``MetaTensor`` carrying the applied operations, so :func:`invert_to_input` can bring a
prediction back to the input file's voxel grid.

Random part (:func:`train_transforms`): pad to ``patch_size``, ``samples_per_volume`` patches
sampled around the pancreas (``pos_fraction``) or in the body, then (if ``cfg.augment``) nnU-Net's
default augmentation (:func:`standard_augmentation`: rotation, scaling, noise, blur, brightness,
contrast, low resolution, gamma, mirroring), then the domain-generalisation augmentation
``cfg.domain_aug`` (:mod:`dualssl.data.augment`). Patches are plain tensors: ``image``
``(1, *patch_size)`` float32, ``label`` ``(1, *patch_size)`` float32 in {0, 1}.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.utils import reset_ops_id

from dualssl.config import DataConfig
from dualssl.data.augment import domain_augmentation
from dualssl.data.datalist import DatasetError

BODY_HU = -500.0
"""Voxels above this HU (soft tissue, fat, bone; not air) define the body's bounding box."""
CROP_MARGIN = 8
"""Voxels kept around the body's bounding box."""
AFFINE_ATOL = 1e-3
"""Largest difference (mm, or direction cosine) between image and label affines still called equal."""
PREPROCESS_VERSION = 1
"""Bump when the deterministic pipeline changes: it is part of the on-disk cache key."""


# --- small transforms ---------------------------------------------------------------------------

def _filename(x: Any, fallback: str) -> str:
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", fallback))


class LoadNiftid(MapTransform):
    """MONAI ``LoadImaged`` (``NibabelReader``, channel-first, ``image_only=False``) per key, with
    errors that name the file: missing, unreadable or truncated NIfTI, more than one channel."""

    def __init__(self, keys: Any) -> None:
        super().__init__(keys)
        # dtype=None keeps the file's dtype (int16 CT, uint8 labels): half to a quarter of float32's memory
        self._load = {key: LoadImaged(key, reader="NibabelReader", image_only=False, ensure_channel_first=True,
                                      dtype=None) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            if not Path(path).is_file():
                raise DatasetError(f"{path}: {key} file not found; fix the path in the dataset list")
            try:
                d = self._load[key](d)
            except Exception as exc:  # nibabel/zlib/EOF errors carry no file name
                raise DatasetError(f"{path}: cannot read {key} as NIfTI ({type(exc).__name__}: {exc}); "
                                   "the file is truncated, corrupt or not NIfTI - re-export it") from exc
            x = d[key]
            if x.ndim != 4 or x.shape[0] != 1:
                raise DatasetError(f"{path}: expected one 3D volume, got array of shape "
                                   f"{tuple(x.shape[1:])} after channel-first; give a single-channel 3D NIfTI")
        return d


class CheckInputd(MapTransform):
    """Reject NaN/inf intensities, image/label shape or affine mismatch, non-integer labels and
    labels outside ``label_values`` (if given); warn on an empty label. Runs on the loaded, not yet
    reoriented volumes."""

    def __init__(self, image_key: str = "image", label_key: str | None = "label",
                 label_values: Sequence[int] | None = None) -> None:
        super().__init__([k for k in (image_key, label_key) if k])
        self.image_key, self.label_key = image_key, label_key
        self.label_values = None if label_values is None else sorted(int(v) for v in label_values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        image_path = _filename(image, self.image_key)
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            n_bad = int((~torch.isfinite(image)).sum())
            raise DatasetError(f"{image_path}: {n_bad} NaN or inf intensities; re-export the scan "
                               "(or replace them with the air value) before training")
        if self.label_key is None or self.label_key not in d:
            return d
        label = d[self.label_key]
        label_path = _filename(label, self.label_key)
        problem = pair_mismatch(tuple(image.shape[1:]), image.affine.numpy(),
                                tuple(label.shape[1:]), label.affine.numpy())
        if problem:
            raise DatasetError(f"{label_path}: {problem} of image {image_path}; resample the label onto "
                               "the image grid")
        if label.is_floating_point():
            bad = not bool(torch.isfinite(label).all()) or bool((label != torch.round(label)).any())
        else:
            bad = False
        if bad or float(label.min()) < 0:
            raise DatasetError(f"{label_path}: label values must be non-negative integers "
                               "(0 background, 1 pancreas, 2 tumour)")
        if self.label_values is not None:
            extra = undeclared_values(label, self.label_values)
            if extra:
                raise DatasetError(f"{label_path}: label values {extra} are not declared (declared: "
                                   f"{self.label_values}); fix the label or the dataset's `labels`")
        if not bool((label > 0).any()):
            warnings.warn(f"{label_path}: label is empty (no pancreas voxel); only background "
                          "patches can be drawn from this case", stacklevel=2)
        return d


def undeclared_values(label: torch.Tensor, declared: Sequence[int]) -> list[int]:
    """Values present in an integer-valued ``label`` that ``declared`` lacks (no int64 copy when
    the largest value is small, as it is for a label map)."""
    top = int(label.max()) if label.numel() else 0
    if top > 255:
        present = torch.bincount(label.flatten().to(torch.int64)).nonzero().flatten().tolist()
        return sorted(set(present) - set(declared))
    return [v for v in range(1, top + 1) if v not in declared and bool((label == v).any())]


def pair_mismatch(image_shape: tuple[int, ...], image_affine: np.ndarray,
                  label_shape: tuple[int, ...], label_affine: np.ndarray) -> str | None:
    """A sentence describing how a label's grid differs from its image's, or None if they match."""
    if tuple(image_shape) != tuple(label_shape):
        return f"label shape {tuple(label_shape)} differs from shape {tuple(image_shape)}"
    if not np.allclose(image_affine, label_affine, atol=AFFINE_ATOL):
        diff = float(np.abs(np.asarray(image_affine) - np.asarray(label_affine)).max())
        return f"label affine differs (by up to {diff:.4g}) from the affine"
    return None


class MergeLabelsd(MapTransform):
    """Every non-zero label (MSD Task07: 1 pancreas, 2 tumour) becomes 1."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > 0).to(torch.uint8)  # keeps MetaTensor meta
        return d


class BinarizeLabeld(MapTransform):
    """Label -> float32 {0, 1} (after interpolating augmentations)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > 0.5).to(torch.float32)
        return d


class AboveThreshold:
    """``select_fn`` of the body crop: voxels above ``threshold``; everything if none is."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = x > self.threshold
        return mask if bool(mask.any()) else torch.ones_like(mask)


# --- pipelines ------------------------------------------------------------------------------------

class Pipeline(Compose):
    """``Compose`` that lets a :class:`DatasetError` (which names the file) through instead of MONAI's
    ``RuntimeError("applying transform ...")`` wrapper, and logs no data statistics on failure."""

    def __init__(self, transforms: list[Any]) -> None:
        super().__init__(transforms, log_stats=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, DatasetError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def _geometry(cfg: DataConfig, keys: list[str]) -> list[Any]:
    """The invertible part shared by preprocessing and inference (same order, same classes)."""
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return [
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=tuple(float(s) for s in cfg.spacing), mode=modes, dtype=torch.float32),
        CropForegroundd(keys, source_key="image", select_fn=AboveThreshold(BODY_HU), margin=CROP_MARGIN,
                        allow_smaller=True, start_coord_key=None, end_coord_key=None),
    ]


def _window(cfg: DataConfig) -> ScaleIntensityRanged:
    low, high = (float(v) for v in cfg.hu_window)
    return ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


def preprocess_transforms(cfg: DataConfig, with_label: bool = True,
                          label_values: Sequence[int] | None = None) -> Pipeline:
    """Deterministic, cacheable: ``{"image": path, "label": path, ...}`` -> preprocessed volumes.

    Output ``image`` ``(1, X, Y, Z)`` float32 in [0, 1], ``label`` ``(1, X, Y, Z)`` uint8 in {0, 1}
    (RAS, ``cfg.spacing``, cropped to the body). Raises :class:`DatasetError` naming the file on
    bad input, including label values outside ``label_values`` (the dataset's declared labels,
    :attr:`DatasetInfo.label_values`; None accepts any non-negative integer).
    """
    keys = ["image", "label"] if with_label else ["image"]
    label_key = "label" if with_label else None
    return Pipeline([
        LoadNiftid(keys),
        CheckInputd("image", label_key, label_values),
        *([MergeLabelsd("label")] if with_label else []),
        *_geometry(cfg, keys),
        _window(cfg),
        CastToTyped(keys, dtype=[np.float32, np.uint8][: len(keys)]),
    ])


def inference_transforms(cfg: DataConfig) -> Pipeline:
    """Image only, for prediction: ``{"image": path}`` -> ``image`` ``(1, X, Y, Z)`` float32 in [0, 1].

    The geometric steps are the same as :func:`preprocess_transforms`, so a prediction on either
    output goes back to the input's grid with :func:`invert_to_input`.
    """
    return preprocess_transforms(cfg, with_label=False)


def train_transforms(cfg: DataConfig) -> Pipeline:
    """Random part: one preprocessed volume -> list of ``cfg.samples_per_volume`` patch dicts.

    Each patch: ``image`` ``(1, *cfg.patch_size)`` float32, ``label`` ``(1, *cfg.patch_size)``
    float32 in {0, 1}, plain tensors (the volume's ``case_id`` and ``site`` are kept).
    ``cfg.augment=False`` drops the standard augmentation; ``cfg.domain_aug`` (``bigaug``,
    ``randconv``, ``gin``; :mod:`dualssl.data.augment`) runs after it either way.
    """
    keys = ["image", "label"]
    steps = patch_sampling(cfg)
    if cfg.augment:
        steps += standard_augmentation()
    domain = domain_augmentation(cfg.domain_aug)
    if domain is not None:
        steps.append(domain)
    steps += [BinarizeLabeld("label"), *_plain_tensors(keys)]
    return Pipeline(steps)


def standard_augmentation() -> list[Any]:
    """nnU-Net v2's default augmentation (``nnUNetTrainer.get_training_transforms``) in MONAI's random
    dict transforms, with its probabilities: the baseline every arm of the domain-shift study trains with.

    On ``image`` ``(1, X, Y, Z)`` float32 in [0, 1] (the HU window) and ``label`` ``(1, X, Y, Z)``, in
    nnU-Net's order: rotation (p 0.2, +-30 deg about every axis) and isotropic scaling (p 0.2, 0.7-1.4),
    Gaussian noise (p 0.1), Gaussian blur (p 0.2 x 0.5 per channel = 0.1 for one channel, sigma 0.5-1
    voxel), multiplicative brightness (p 0.15, x0.75-1.25), contrast about the mean with the range kept
    (p 0.15, x0.75-1.25), simulated low resolution (p 0.25 x 0.5 per channel, zoom 0.5-1), gamma on the
    inverted image (p 0.1) and on the image (p 0.3), both 0.7-1.5 with mean and std retained, mirroring
    (p 0.5 per axis). Differences from nnU-Net: the patch is cropped before the spatial transforms, so a
    rotated or zoomed-out patch has zero (-100 HU) corners; rotation and scaling are two resamplings;
    the noise's std is drawn from [0, 0.075] of the window (nnU-Net: variance 0-0.1 of z-scored
    intensities, std up to 0.32 of a CT foreground std of about 80 HU, i.e. about 25 HU of our 340).
    Labels are resampled nearest-neighbour.
    """
    keys = ["image", "label"]
    rotation = math.radians(30.0)
    return [
        RandRotated(keys, range_x=rotation, range_y=rotation, range_z=rotation, prob=0.2, keep_size=True,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandZoomd(keys, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=("trilinear", "nearest"),
                  padding_mode="constant", keep_size=True),
        RandGaussianNoised("image", prob=0.1, std=0.075, sample_std=True),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),
        RandScaleIntensityd("image", factors=(-0.25, 0.25), prob=0.15),
        RandScaleIntensityFixedMeand("image", factors=(-0.25, 0.25), fixed_mean=True, preserve_range=True,
                                     prob=0.15),
        RandSimulateLowResolutiond("image", prob=0.125, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True),
        *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
    ]


def patch_sampling(cfg: DataConfig) -> list[Any]:
    """Pad to ``patch_size``, then ``samples_per_volume`` patches centred on pancreas voxels with
    probability ``pos_fraction``, else on body voxels (windowed intensity > 0)."""
    keys = ["image", "label"]
    patch = tuple(int(p) for p in cfg.patch_size)
    return [
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=patch, pos=cfg.pos_fraction,
                               neg=1.0 - cfg.pos_fraction, num_samples=cfg.samples_per_volume,
                               image_key="image", image_threshold=0.0),
    ]


def val_patch_transforms(cfg: DataConfig) -> Pipeline:
    """Validation patches: the same sampling as training without augmentation (seed it per item)."""
    return Pipeline([*patch_sampling(cfg), BinarizeLabeld("label"), *_plain_tensors(["image", "label"])])


def _plain_tensors(keys: list[str]) -> list[Any]:
    return [EnsureTyped(keys, dtype=torch.float32, track_meta=False),
            DeleteItemsd([f"{k}_meta_dict" for k in keys] + [f"{k}_transforms" for k in keys])]


# --- back to the input's geometry -------------------------------------------------------------------

def invert_to_input(pred: torch.Tensor, data: Mapping[Hashable, Any], cfg: DataConfig, *,
                    nearest: bool = True) -> np.ndarray:
    """Bring a prediction on a preprocessed volume back to the input file's voxel grid.

    Args:
        pred: ``(1, X, Y, Z)`` (tensor or MetaTensor) on the grid of ``data["image"]``; ``(X, Y, Z)``
            and ``(C, X, Y, Z)`` work too (C channels come back as ``(C, X0, Y0, Z0)``).
        data: the unbatched dict from :func:`preprocess_transforms`, :func:`inference_transforms`
            or a cached dataset; ``data["image"]`` must be the MetaTensor it produced.
        cfg: the DataConfig that produced ``data``.
        nearest: nearest-neighbour resampling (masks); False uses the forward modes (probabilities).

    Returns:
        ``(X0, Y0, Z0)`` numpy array in the original file's voxel grid and orientation (integer
        predictions keep their dtype, others come back float32); write it with
        :func:`original_affine` ``(data)``.
    """
    image = data["image"]
    if not isinstance(image, MetaTensor) or not image.applied_operations:
        raise ValueError("invert_to_input: data['image'] carries no applied operations; pass the dict "
                         "produced by preprocess_transforms/inference_transforms (track_meta on)")
    if tuple(pred.shape[-3:]) != tuple(image.shape[-3:]):
        raise ValueError(f"invert_to_input: prediction shape {tuple(pred.shape)} does not match the "
                         f"preprocessed image {tuple(image.shape)}")
    pred = pred.detach().cpu()
    if pred.ndim == 3:
        pred = pred[None]
    image = reset_ops_id(image.clone())  # the ops were recorded by another Compose instance
    inverter = Invertd("pred", transform=inference_transforms(cfg), orig_keys="image", nearest_interp=nearest)
    out = inverter({"pred": pred.float(), "image": image})["pred"].detach().cpu().numpy()
    out = out[0] if out.shape[0] == 1 else out
    if not pred.is_floating_point():
        out = np.rint(out).astype(torch.empty((), dtype=pred.dtype).numpy().dtype)
    return out


def original_affine(data: Mapping[Hashable, Any]) -> np.ndarray:
    """The 4x4 affine of the input file (for writing :func:`invert_to_input`'s output)."""
    meta = data["image"].meta
    return np.asarray(meta.get("original_affine", meta["affine"]), dtype=np.float64)
