"""On-disk cache of preprocessed volumes, shared by concurrent trials (MONAI ``PersistentDataset``).

Each case is preprocessed once per preprocessing config and stored as one ``.pt`` file under
``<cache root>/<preprocessing hash>/``, where the cache root is ``cfg.cache_dir`` or, when empty,
``<dataset root>/.dualssl_cache`` (falling back to ``~/.cache/dualssl/<root hash>`` when the dataset
root is read-only). A file's name hashes the case's file paths, sizes and modification times, so an
edited scan is preprocessed again instead of being served stale.

Concurrency: MONAI writes a new item into a system temp folder and ``shutil.move``\\ s it into the
cache; when the temp folder and the cache sit on different file systems (local /tmp, shared cache)
that move is a copy, and another process can read a half-written file (MONAI then deletes it or
fails). :class:`SharedPersistentDataset` writes the temp file inside the cache folder itself and
publishes it with ``os.replace``, which is atomic on POSIX: readers see no file or a whole one, and
two writers of the same item just replace identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from enum import Enum
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, Callable, Sequence

import monai
import numpy as np
import torch
from monai.data import Dataset, MetaTensor, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.utils import convert_to_tensor, look_up_option

from dualssl.config import DataConfig
from dualssl.data.datalist import Case, DatasetError
from dualssl.data import transforms as T

CACHE_FOLDER = ".dualssl_cache"


def preprocessing_hash(cfg: DataConfig) -> str:
    """Short hash of everything that changes a preprocessed volume."""
    key = {
        "spacing": [float(s) for s in cfg.spacing],
        "hu_window": [float(v) for v in cfg.hu_window],
        "body_hu": T.BODY_HU,
        "margin": T.CROP_MARGIN,
        "version": T.PREPROCESS_VERSION,
        "monai": ".".join(monai.__version__.split(".")[:2]),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir_for(cfg: DataConfig) -> Path:
    """``<cfg.cache_dir or <dataset root>/.dualssl_cache>/<preprocessing hash>`` (creates the base folder)."""
    if cfg.cache_dir:
        base = Path(cfg.cache_dir).expanduser()
    else:
        folder, fallback = _root_bases(cfg)
        base = folder / CACHE_FOLDER
        if not _writable(base):
            warnings.warn(f"{folder}: dataset root is not writable; caching preprocessed volumes in "
                          f"{fallback} (set data.cache_dir to a shared folder for several machines)", stacklevel=2)
            base = fallback
    return base / preprocessing_hash(cfg)


def _root_bases(cfg: DataConfig) -> tuple[Path, Path]:
    """(the dataset root's folder, the per-user fallback cache base for a read-only root)."""
    if not cfg.root:
        raise DatasetError("data.root: empty; set the dataset root (or data.cache_dir) to locate the cache")
    root = Path(cfg.root).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dualssl" / digest
    return (root if root.is_dir() else root.parent), fallback


def cache_dir_candidates(cfg: DataConfig) -> list[Path]:
    """Where :func:`cache_dir_for` may have put ``cfg``'s cache, without creating anything (for readers)."""
    if cfg.cache_dir:
        return [Path(cfg.cache_dir).expanduser() / preprocessing_hash(cfg)]
    try:
        folder, fallback = _root_bases(cfg)
    except DatasetError:
        return []
    return [folder / CACHE_FOLDER / preprocessing_hash(cfg), fallback / preprocessing_hash(cfg)]


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def case_key(item: dict[str, Any]) -> bytes:
    """Cache key of one data dict: absolute paths, sizes and mtimes of its files (hex bytes)."""
    parts = []
    for key in ("image", "label"):
        if key in item:
            path = Path(str(item[key]))
            try:
                stat = path.stat()
                parts.append([key, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
            except OSError:  # missing file: the transform will raise a clear error
                parts.append([key, str(path), -1, -1])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest().encode()


def to_safe(obj: Any) -> Any:
    """Numpy arrays/scalars -> tensors/Python scalars and MONAI's string enums -> str, recursively
    (meta data and applied operations of MetaTensors included), so that cache files load with
    ``torch.load(weights_only=True)``."""
    if isinstance(obj, MetaTensor):
        obj.meta = to_safe(dict(obj.meta))
        obj.applied_operations = to_safe(list(obj.applied_operations))
        return obj
    if isinstance(obj, np.ndarray):
        return torch.as_tensor(obj) if obj.dtype != object else [to_safe(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Enum) and isinstance(obj, str):
        return str(obj.value)
    if isinstance(obj, dict):
        return {to_safe(k): to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_safe(v) for v in obj)
    return obj


class SharedPersistentDataset(PersistentDataset):
    """``PersistentDataset`` whose cache files appear atomically (safe for concurrent processes) and
    load with ``weights_only=True``."""

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return self._pre_transform(dict(item_transformed))
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=self.weights_only)
            except (UnpicklingError, RuntimeError, EOFError) as exc:  # e.g. a disk filled up mid-write
                warnings.warn(f"{hashfile}: unreadable cache file ({exc}); preprocessing again", stacklevel=2)
        item = self._pre_transform(dict(item_transformed))
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{hashfile.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(to_safe(convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta)), fh,
                           pickle_module=look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD),
                           pickle_protocol=self.pickle_protocol)
            os.replace(tmp, hashfile)
        except OSError as exc:  # a full or read-only cache must not stop training
            warnings.warn(f"{hashfile}: could not write cache file ({exc}); continuing uncached", stacklevel=2)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return item


def cache_file(case: Case, folder: str | Path) -> Path:
    """The cache file of ``case`` in ``folder`` (a ``cache_dir_for`` folder): the name
    :class:`SharedPersistentDataset` reads and writes (:func:`case_key`, no transform hash)."""
    return Path(folder) / f"{case_key(case.as_dict()).decode('utf-8')}.pt"


def ensure_cached(case: Case, cfg: DataConfig, folder: str | Path,
                  label_values: Sequence[int] | None = None) -> bool:
    """Preprocess ``case`` into ``folder`` unless its file is already there; True if it was written.

    The one-pass preprocessing of a study (``studies/preprocess.py``) calls this once per case, so
    trials find every file present and only read. Memory: one case's pipeline (the scan as stored,
    its resampled float32 copy and the label). Raises :class:`DatasetError` naming the file.
    """
    target = cache_file(case, folder)
    if target.is_file():
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    ds = SharedPersistentDataset(data=[case.as_dict()], transform=T.preprocess_transforms(cfg, label_values=label_values),
                                 cache_dir=folder, hash_func=case_key, track_meta=True)
    try:
        ds[0]
    except DatasetError:
        raise
    except Exception as exc:  # MONAI/torch errors: name the scan
        raise DatasetError(f"{case.image}: preprocessing failed ({type(exc).__name__}: {exc}); check the scan "
                           "with `dualssl verify-dataset`") from exc
    return True


class _Then(Dataset):
    """Items of ``base`` followed by a random transform (kept out of the cache)."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        super().__init__(data=base, transform=transform)


def cached_dataset(cases: Sequence[Case], cfg: DataConfig, random_transform: Callable | None = None,
                   cache_dir: str | Path | None = None, label_values: Sequence[int] | None = None) -> Dataset:
    """Preprocessed cases from the shared on-disk cache, then ``random_transform`` (not cached).

    Items are the dicts of :func:`dualssl.data.transforms.preprocess_transforms` (``image``
    ``(1, X, Y, Z)`` float32 MetaTensor, ``label`` uint8, ``case_id``, ``site``) or whatever
    ``random_transform`` makes of them. ``cache_dir`` overrides :func:`cache_dir_for`;
    ``label_values`` (the declared labels) are checked when a case is first preprocessed.
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_dir_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    base = SharedPersistentDataset(
        data=[c.as_dict() for c in cases], transform=T.preprocess_transforms(cfg, label_values=label_values),
        cache_dir=folder,
        hash_func=case_key, track_meta=True)
    return base if random_transform is None else _Then(base, random_transform)


class CachedInference:
    """Inference preprocessing that reads a case's image from the study's cache when it is there.

    A drop-in ``preprocess`` for ``dualssl.evaluation.inference.Predictor``: ``{"image": path}`` ->
    ``{"image": MetaTensor (1, X, Y, Z)}`` float32 in [0, 1] whose ``affine`` locates the preprocessed
    grid in the file's world space. For a path of one of ``cases`` whose cache file (:func:`cache_file`,
    the very file the study's one pass and the trials write: image and label preprocessed together)
    exists in one of :func:`cache_dir_candidates`, the cached image is returned; otherwise the file goes
    through :func:`dualssl.data.transforms.inference_transforms` as it always did. The image part of
    :func:`~dualssl.data.transforms.preprocess_transforms` is the same computation as
    ``inference_transforms`` (the label never moves the image: same reorientation, resampling, body crop
    from the image, window), so both give the same tensor and affine (``tests/test_cached_inference.py``).
    Never writes: an uncached case is preprocessed in memory, as before.

    ``hits`` and ``misses`` count the calls served from the cache and from the file.
    """

    def __init__(self, cfg: DataConfig, cases: Sequence[Case]) -> None:
        self.cfg = cfg
        self.folders = cache_dir_candidates(cfg)
        self.cases = {os.path.abspath(str(c.image)): c for c in cases}
        self.hits = self.misses = 0
        self._transforms: Callable | None = None

    def cached_path(self, image: str | Path) -> Path | None:
        """The existing cache file of ``image``'s case, or None."""
        case = self.cases.get(os.path.abspath(str(image)))
        if case is None:
            return None
        for folder in self.folders:
            path = cache_file(case, folder)
            if path.is_file():
                return path
        return None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        path = self.cached_path(data["image"])
        if path is not None:
            try:
                item = torch.load(path, weights_only=True)
                self.hits += 1
                return {**data, "image": item["image"]}
            except (UnpicklingError, RuntimeError, EOFError, OSError, KeyError, TypeError) as exc:
                warnings.warn(f"{path}: unreadable cache file ({exc}); preprocessing {data['image']} again",
                              stacklevel=2)
        if self._transforms is None:
            self._transforms = T.inference_transforms(self.cfg)
        self.misses += 1
        return self._transforms(data)
