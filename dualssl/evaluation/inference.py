"""Whole-volume inference: sliding window, flip TTA, post-processing, back to the input's geometry.

``Predictor`` works on any ``torch.nn.Module`` mapping ``(B,1,X,Y,Z)`` images to ``(B,K,X,Y,Z)`` logits
(``dualssl.models.SegmentationNet`` in practice). Windows of ``cfg.data.patch_size`` are blended with
Gaussian weights (MONAI ``sliding_window_inference``); the softmax is blended, not the logits, so the
flip TTA averages probabilities throughout.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample
from monai.utils import convert_to_tensor

from dualssl.config import Config
from dualssl.evaluation.postprocess import keep_large_components
from dualssl.precision import amp_dtype

# Every subset of the three spatial axes of a (B,C,X,Y,Z) batch: identity + 7 flips.
FLIP_AXES: tuple[tuple[int, ...], ...] = tuple(
    axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r))


def pad_single_batch(x: torch.Tensor) -> torch.Tensor:
    """``(1, C, X, Y, Z)`` on the CPU -> the same sample twice, ``(2, C, X, Y, Z)``; else ``x`` itself.

    On the CPU, torch's ``conv3d`` takes a path for a batch of one sample that is 5-10x slower per
    sample than for two (measured with torch 2.13: 287 ms vs 24 ms per sample for an 8->8 channel
    3x3x3 convolution at 48x48x32, ``benchmarks/conv_batch.py``), so one window costs more than
    two. The caller keeps the first sample's output."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return torch.cat([x, x])
    return x


class Predictor:
    """Segment whole volumes with a trained model.

    Args:
        model: maps ``(B,1,X,Y,Z)`` to logits ``(B,K,X,Y,Z)``, K >= 2 (channel 0 = background).
            It runs in eval mode under ``torch.inference_mode``; its own train/eval mode is
            restored after each prediction (safe to call from a training loop's validation).
        cfg: uses ``data.patch_size`` (window), ``eval.sw_batch_size``, ``eval.sw_overlap``,
            ``eval.tta_flips``, ``eval.keep_largest`` and ``optim.amp`` (autocast, CUDA only).
        device: defaults to CUDA when available, else CPU.
        preprocess: dict transform ``{"image": path} -> {"image": MetaTensor (1,X,Y,Z)}`` whose
            ``affine`` locates the preprocessed grid in the file's world space. Defaults to
            ``dualssl.data.transforms.inference_transforms(cfg.data)``.
        amp: overrides ``cfg.optim.amp`` for inference.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: str | torch.device | None = None, *,
                 preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 amp: str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.amp_dtype = amp_dtype(amp if amp is not None else cfg.optim.amp, self.device)
        self._preprocess = preprocess

    @property
    def preprocess(self) -> Callable[[dict[str, Any]], dict[str, Any]]:
        if self._preprocess is None:
            from dualssl.data.transforms import inference_transforms

            self._preprocess = inference_transforms(self.cfg.data)
        return self._preprocess

    # --- tensors ---------------------------------------------------------------------------
    def _window_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """(b,1,*roi) -> (b,K,*roi) float32 softmax."""
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = self.model(pad_single_batch(x))[: x.shape[0]]
        if logits.ndim != 5 or logits.shape[0] != x.shape[0] or logits.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output {tuple(logits.shape)} does not match its input {tuple(x.shape)}: "
                             f"expected logits (B,K,X,Y,Z)")
        return torch.softmax(logits.float(), dim=1)

    def _sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(
            x, roi_size=tuple(int(s) for s in self.cfg.data.patch_size),
            sw_batch_size=self.cfg.eval.sw_batch_size, predictor=self._window_softmax,
            overlap=self.cfg.eval.sw_overlap, mode="gaussian")

    def predict_probs(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Class probabilities of a whole volume.

        Args:
            image: ``(1,X,Y,Z)`` preprocessed image (any size: windows are padded at the borders).
            tta: average the softmax over all 8 flip combinations of the 3 spatial axes
                (default ``cfg.eval.tta_flips``).

        Returns:
            ``(K,X,Y,Z)`` float32 on the CPU, summing to 1 over K.
        """
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"image: expected one channel-first volume (1,X,Y,Z), got {tuple(image.shape)}")
        tta = self.cfg.eval.tta_flips if tta is None else tta
        x = convert_to_tensor(image, dtype=torch.float32, device=self.device, track_meta=False)[None]
        was_training = self.model.training  # a model validated during training goes back to training
        self.model.eval()
        try:
            with torch.inference_mode():
                if not tta:
                    probs = self._sliding_window(x)
                else:
                    probs = torch.zeros((), device=self.device)
                    for axes in FLIP_AXES:
                        out = self._sliding_window(torch.flip(x, axes) if axes else x)
                        probs = probs + (torch.flip(out, axes) if axes else out)
                    probs = probs / len(FLIP_AXES)
        finally:
            self.model.train(was_training)
        return convert_to_tensor(probs[0], device="cpu", track_meta=False)

    def labels_from_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """``(K,X,Y,Z)`` probabilities -> ``(1,X,Y,Z)`` uint8 argmax labels, post-processed."""
        labels = argmax_channels(probs)
        if self.cfg.eval.keep_largest:
            labels = keep_large_components(labels)
        return labels

    def predict_volume(self, image: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """``(1,X,Y,Z)`` preprocessed image -> ``(1,X,Y,Z)`` uint8 labels (0 = background)."""
        return self.labels_from_probs(self.predict_probs(image, tta))

    # --- files -----------------------------------------------------------------------------
    def predict_file(self, path: str | Path, tta: bool | None = None) -> nib.Nifti1Image:
        """Segment one NIfTI scan; the mask has the input's own shape and affine (uint8 labels).

        The image goes through ``preprocess`` (reorientation, resampling, windowing, cropping); the
        foreground probabilities are resampled (linear) from the preprocessed grid back onto the
        input's grid through the two affines (world coordinates of the file), then arg-maxed and
        post-processed there. Voxels outside the preprocessed field of view are background.
        """
        return self.segment_file(path, tta)[0]

    def segment_file(self, path: str | Path, tta: bool | None = None, *,
                     probabilities: bool = False) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
        """:meth:`predict_file`'s mask and, when ``probabilities``, the foreground probability
        (float32, the sum of the non-background classes) resampled onto the whole input grid (a second,
        whole-grid resampling: about 4 bytes x 4 per input voxel more memory; the mask never depends on it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input scan not found")
        try:
            ref = nib.load(path)
        except Exception as exc:  # nibabel raises several types for foreign files
            raise ValueError(f"{path}: not a readable NIfTI file ({exc})") from exc
        shape = tuple(int(s) for s in ref.shape)
        if len(shape) < 3 or any(s != 1 for s in shape[3:]):
            raise ValueError(f"{path}: expected a 3D scan, got shape {shape}")
        shape = shape[:3]

        image = self.preprocess({"image": str(path)})["image"]
        if not isinstance(image, MetaTensor):
            raise TypeError(f"{path}: preprocessing must return a MONAI MetaTensor with an affine, "
                            f"got {type(image).__name__}")
        probs = self.predict_probs(image, tta)
        src_affine = image.affine.detach().cpu()
        mask = np.zeros(shape, dtype=np.uint8)
        box = _foreground_box(probs, src_affine.numpy(), ref.affine, shape)
        if box is not None:
            # only the part of the input's grid that can hold foreground is resampled: a whole
            # 512x512x240 grid would cost gigabytes of sampling coordinates for a 60 ml organ
            lo, hi = box
            foreground = _resample(probs[1:], src_affine, ref.affine @ _translation(lo), tuple(hi - lo))
            background = (1.0 - foreground.sum(dim=0, keepdim=True)).clamp_min(0.0)
            labels = self.labels_from_probs(torch.cat([background, foreground]))[0].numpy()
            mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = labels

        header = ref.header.copy() if type(ref.header) is nib.Nifti1Header else None
        out = nib.Nifti1Image(mask, ref.affine, header=header)
        out.set_data_dtype(np.uint8)
        if not probabilities:
            return out, None
        whole = _resample(probs[1:], src_affine, ref.affine, shape).sum(dim=0).clamp(0.0, 1.0).numpy()
        prob_img = nib.Nifti1Image(whole.astype(np.float32), ref.affine)
        prob_img.set_data_dtype(np.float32)
        return out, prob_img


def _resample(probs: torch.Tensor, src_affine: torch.Tensor, dst_affine: np.ndarray,
              shape: tuple[int, ...]) -> torch.Tensor:
    """``(C, *src)`` probabilities at ``src_affine`` -> ``(C, *shape)`` float32 on the grid ``dst_affine``
    (linear, zeros outside the source's field of view)."""
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        MetaTensor(probs, affine=src_affine), dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64),
        spatial_size=tuple(int(s) for s in shape))
    return convert_to_tensor(out, track_meta=False)


def argmax_channels(probs: torch.Tensor) -> torch.Tensor:
    """``(K,X,Y,Z)`` -> ``(1,X,Y,Z)`` uint8 index of the largest channel (the first one on ties), as
    ``torch.argmax(probs, dim=0, keepdim=True)`` but one channel at a time.

    ``torch.argmax`` over a short leading axis walks memory with a stride of a whole volume: on the
    CPU it took 28-47 s for ``(2, 512, 418, 240)`` (the NIH scan's grid), this takes 3 s.
    """
    if probs.ndim != 4 or not 1 <= probs.shape[0] <= 255:
        raise ValueError(f"probs: expected (K,X,Y,Z) with 1 <= K <= 255, got {tuple(probs.shape)}")
    labels = torch.zeros((1, *probs.shape[1:]), dtype=torch.uint8, device=probs.device)
    best = probs[0].clone()
    for k in range(1, probs.shape[0]):
        better = probs[k] > best
        labels[0].masked_fill_(better, k)
        torch.maximum(best, probs[k], out=best)
    return labels


def _translation(offset: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = offset
    return out


def _foreground_box(probs: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray,
                    dst_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxel box ``[lo, hi)`` of the destination grid that linear resampling of ``probs`` can make
    non-background; None when no voxel can.

    A class can win the argmax only where its probability is at least 1/K, and a linearly
    interpolated value reaches 1/K only next to a source voxel that does; so the box covers the
    source voxels at or above 1/K, grown by one voxel, mapped through both affines.
    """
    k = probs.shape[0]
    candidates = (probs[1:] >= 1.0 / k).any(dim=0).numpy()
    if not candidates.any():
        return None
    idx = np.argwhere(candidates)
    lo_src, hi_src = idx.min(0) - 1.0, idx.max(0) + 1.0
    corners = np.array(list(itertools.product(*zip(lo_src, hi_src))), dtype=np.float64)
    to_dst = np.linalg.solve(dst_affine, src_affine)
    mapped = corners @ to_dst[:3, :3].T + to_dst[:3, 3]
    lo = np.clip(np.floor(mapped.min(0)) - 1, 0, dst_shape).astype(int)
    hi = np.clip(np.ceil(mapped.max(0)) + 2, 0, dst_shape).astype(int)
    return (lo, hi) if bool(np.all(hi > lo)) else None
