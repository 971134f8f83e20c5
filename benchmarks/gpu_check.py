"""GPU check: one dual-SSL training step and a sliding-window prediction on CUDA with AMP.

Needs only torch, monai and nibabel (plus this repository on the path). Prints step time, voxels/s
and peak GPU memory. On a machine without CUDA it says so and exits 0 after a CPU dry run
(``--allow-cpu``) or exits 2.

    python benchmarks/gpu_check.py --widths 32,64,128,256 --patch 96,96,64 --batch 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def synthetic_batch(batch: int, patch: tuple[int, int, int], device: torch.device):
    """(B,1,X,Y,Z) image in [0,1] with a curved pancreas-like blob as label."""
    g = torch.Generator().manual_seed(0)
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in patch], indexing="ij")
    tube = ((x - 0.3 * torch.sin(2 * y)) ** 2 / 0.04 + z**2 / 0.15) < 1.0
    label = (tube & (y.abs() < 0.8)).float()[None, None].repeat(batch, 1, 1, 1, 1)
    image = 0.4 + 0.2 * label + 0.05 * torch.randn(label.shape, generator=g)
    return image.clamp(0, 1).to(device), label.to(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,64,128,256")
    parser.add_argument("--patch", default="96,96,64")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--volume", default="256,256,160", help="whole-volume size for sliding window")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()

    from monai.inferers import sliding_window_inference

    from dualssl.config import Config
    from dualssl.precision import amp_dtype as resolve_amp
    from dualssl.losses.composite import DualSSLLoss
    from dualssl.models import SegmentationNet
    from dualssl.models.factory import build_model

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: nothing to check (use --allow-cpu for a dry run)")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    patch = tuple(int(v) for v in args.patch.split(","))
    cfg = Config().with_overrides({"model.widths": args.widths, "data.patch_size": args.patch,
                                   "optim.amp": args.amp}).validate()
    amp_dtype = resolve_amp(cfg.optim.amp, device)
    net = build_model(cfg.model).to(device)
    criterion = DualSSLLoss(cfg.loss, spacing=cfg.data.spacing).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    image, label = synthetic_batch(args.batch, patch, device)
    print(f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"amp {amp_dtype}, widths {cfg.model.widths}, patch {patch}, batch {args.batch}")

    def step() -> float:
        image_in, mask = criterion.corrupt(image, label)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = net(image_in, embeddings=True, restoration=True)
        parts = criterion({k: v.float() for k, v in out.items() if v is not None}, label, image, mask)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(parts["loss"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    net.train()
    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    train_vox = args.batch * patch[0] * patch[1] * patch[2] / step_s
    peak_train = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"train step: {step_s * 1000:.1f} ms, {train_vox / 1e6:.2f} Mvoxel/s, loss {loss:.4f}, "
          f"peak memory {peak_train:.2f} GiB")

    seg = SegmentationNet(net).eval()
    volume = torch.rand(1, 1, *(int(v) for v in args.volume.split(",")), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
        sliding_window_inference(volume, patch, 4, seg, overlap=0.25, mode="gaussian")  # warm-up
        sync()
        t0 = time.perf_counter()
        logits = sliding_window_inference(volume, patch, 4, seg, overlap=0.25, mode="gaussian")
        sync()
    infer_s = time.perf_counter() - t0
    peak_infer = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"sliding window {tuple(volume.shape[2:])}: {infer_s:.2f} s, {volume[0, 0].numel() / infer_s / 1e6:.2f} "
          f"Mvoxel/s, logits {tuple(logits.shape)}, peak memory {peak_infer:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
