"""Checkpoints that hold tensors and plain Python types only.

They load with ``torch.load(weights_only=True)`` (the default since torch 2.6) and resume exactly:
model, optimizer, scheduler, grad scaler, epoch, best-so-far, history and RNG states.

Under DDP only rank 0 writes the checkpoint, so ``rng`` holds every rank's RNG state, a list indexed
by rank (:func:`gather_rng_states`, a collective every rank calls at the epoch boundary); on resume each
rank restores its own (:func:`restore_rank_rng`). Older checkpoints (one process) hold one dict there.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import torch

CHECKPOINT_FORMAT = "dualssl-checkpoint/1"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain types."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derive_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed that is a function of ``keys`` only (NumPy's ``SeedSequence``), so
    ``(seed, epoch, rank)`` and ``(seed + 1, epoch, rank - 1)`` do not collide as sums would."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1)[0])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (one entry without a process group).

    A collective: under ``torch.distributed`` every rank must call it, at the same point."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rank_rng(saved: dict[str, Any] | list[dict[str, Any]], rank: int, fallback_seed: int) -> bool:
    """Restore this rank's entry of a checkpoint's ``rng`` (a list by rank, or one format-1 dict);
    a rank the checkpoint has no state for (more ranks than wrote it) is seeded with ``fallback_seed``
    instead, with a warning that the resume is then not exact. Returns whether the state was restored."""
    states = [saved] if isinstance(saved, dict) else list(saved)
    if rank < len(states):
        set_rng_state(states[rank])
        return True
    warnings.warn(f"checkpoint holds RNG states of {len(states)} rank(s), none for rank {rank}: seeding it "
                  f"afresh, so this resume is not bitwise the uninterrupted run (resume with the same world "
                  f"size for that)", stacklevel=2)
    random.seed(fallback_seed)
    np.random.seed(fallback_seed % 2**32)
    torch.manual_seed(fallback_seed)
    return False


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename) so that a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a dualssl checkpoint with ``weights_only=True``; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise ValueError(f"{path}: not a readable dualssl checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a dualssl checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return state
