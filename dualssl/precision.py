"""Mixed precision: which autocast dtype ``optim.amp`` means on a device (shared by training and inference)."""

from __future__ import annotations

import torch


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``optim.amp`` on ``device``: None on CPU or when ``mode == 'off'``;
    'auto' is bf16 where the GPU supports it, else fp16."""
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp: choose auto, bf16, fp16 or off, got {mode!r}")
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16
