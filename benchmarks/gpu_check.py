"""GPU check: full-size training voxels/s and sliding-window time of the NIH scan, AMP x torch.compile.

Needs only torch, monai, nibabel and PyYAML (plus this repository on the path). For each variant
(AMP off / on, ``torch.compile`` off / on) it times, on one GPU:

* **train**: the engine's step protocol (clean forward for segmentation + contrastive, forward of the
  corrupted crop for restoration only, loss, backward, Adam) on a synthetic batch of the config's
  ``data.batch_size x data.samples_per_volume`` patches: ms/step, Mvoxel/s, peak memory;
* **sliding window**: ``dualssl.evaluation.inference.Predictor.predict_probs`` (Gaussian blending,
  ``eval.sw_batch_size``, ``eval.sw_overlap``, TTA off) on the NIH Pancreas-CT scan
  ``shared/data/real/nih_pancreas_ct_0001`` preprocessed at the config's spacing (Roth et al., TCIA
  2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU, CC BY), or on a random volume when it is absent.

Defaults: ``cluster/full-size.yaml`` (widths 32-64-128-256, patches 96x96x64, 1.5x1.5x2 mm). Timing
brackets the work with ``torch.cuda.synchronize()``; memory is ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. The first calls of each variant (CUDA context, cuDNN autotuning,
and for compiled variants the Dynamo/Inductor compile) are reported apart as warm-up. A total time
budget (``--budget-s``, default 420 s) bounds the run: a variant that would start with too little
time left, or that runs past its share, is reported as skipped, so the check ends in under 8 minutes.

On a machine without CUDA it prints a message and exits 0; ``--allow-cpu`` does a small dry run of
every code path on the CPU instead (narrow net, small patches, small random volume).

    python benchmarks/gpu_check.py                                  # full size, 4 variants
    python benchmarks/gpu_check.py --amp auto --compile off --steps 20
    python benchmarks/gpu_check.py --allow-cpu --compile off         # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

NIH_SCAN = REPO.parent / "shared" / "data" / "real" / "nih_pancreas_ct_0001" / "ct.nii.gz"
CPU_DRY_RUN = {"model.widths": (8, 16, 32, 64), "data.patch_size": (32, 32, 16), "data.batch_size": 1,
               "data.samples_per_volume": 2, "eval.sw_batch_size": 2}


def synthetic_batch(batch: int, patch: tuple[int, int, int], device: torch.device):
    """(B,1,X,Y,Z) image in [0,1] with a curved pancreas-like blob as label."""
    g = torch.Generator().manual_seed(0)
    x, y, z = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in patch], indexing="ij")
    tube = ((x - 0.3 * torch.sin(2 * y)) ** 2 / 0.04 + z**2 / 0.15) < 1.0
    label = (tube & (y.abs() < 0.8)).float()[None, None].repeat(batch, 1, 1, 1, 1)
    image = 0.4 + 0.2 * label + 0.05 * torch.randn(label.shape, generator=g)
    return image.clamp(0, 1).to(device), label.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between variants (peaks are per variant)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OutOfTime(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`OutOfTime` in the main thread after ``seconds`` (SIGALRM; Linux/macOS)."""
    if seconds <= 0:
        raise OutOfTime()

    def handler(signum: int, frame: Any) -> None:
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def train_variant(cfg, device: torch.device, amp_mode: str, compiled: bool, steps: int) -> dict[str, float]:
    """Warm-up seconds (2 steps), ms/step, Mvoxel/s and peak GiB of the engine's step protocol."""
    from dualssl.losses.composite import DualSSLLoss
    from dualssl.models.factory import build_model
    from dualssl.precision import amp_dtype as resolve_amp

    amp_dtype = resolve_amp(amp_mode, device)
    patch = tuple(int(p) for p in cfg.data.patch_size)
    batch = int(cfg.data.batch_size) * int(cfg.data.samples_per_volume)
    torch.manual_seed(0)
    net = build_model(cfg.model).to(device)
    model = torch.compile(net) if compiled else net  # the same parameters; compiled forward and backward
    criterion = DualSSLLoss(cfg.loss, spacing=cfg.data.spacing).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    image, label = synthetic_batch(batch, patch, device)

    def step() -> float:
        # the engine's protocol: clean forward (seg + contrastive), corrupted crop forward (restoration only)
        corrupted = criterion.corrupt(image, label)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(image, embeddings=True)
            rec = model(corrupted.image, restoration=True)
        parts = criterion({k: v.float() for k, v in out.items()}, label, {k: v.float() for k, v in rec.items()},
                          corrupted)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(parts["loss"].detach())

    net.train()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(2):
        step()
    sync(device)
    warm = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    voxels = batch * patch[0] * patch[1] * patch[2]
    return {"train_warm_s": warm, "train_ms": step_s * 1000, "train_mvox": voxels / step_s / 1e6,
            "train_gib": peak_gib(device), "loss": loss}


def infer_variant(cfg, device: torch.device, amp_mode: str, compiled: bool, image: torch.Tensor,
                  repeats: int) -> dict[str, float]:
    """Warm-up seconds (1 call), best seconds, Mvoxel/s and peak GiB of ``Predictor.predict_probs``."""
    from dualssl.evaluation.inference import Predictor
    from dualssl.models import SegmentationNet
    from dualssl.models.factory import build_model

    torch.manual_seed(0)
    seg = SegmentationNet(build_model(cfg.model)).eval().to(device)
    predictor = Predictor(torch.compile(seg) if compiled else seg, cfg, device=device, amp=amp_mode)
    sync(device)
    t0 = time.perf_counter()
    predictor.predict_probs(image, tta=False)
    sync(device)
    warm = time.perf_counter() - t0
    reset_peak(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probs = predictor.predict_probs(image, tta=False)  # ends with a copy to the CPU: synchronised
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    assert probs.shape[1:] == image.shape[1:]
    return {"sw_warm_s": warm, "sw_s": best, "sw_mvox": image[0].numel() / best / 1e6, "sw_gib": peak_gib(device)}


def nih_volume(cfg, source: str) -> tuple[torch.Tensor, str]:
    """The preprocessed NIH scan (``source == 'nih'``, when present) or a random ``X,Y,Z`` volume."""
    if source == "nih" and NIH_SCAN.is_file():
        from monai.utils import convert_to_tensor

        from dualssl.data.transforms import inference_transforms

        t0 = time.perf_counter()
        image = inference_transforms(cfg.data)({"image": str(NIH_SCAN)})["image"]
        image = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        return image, f"NIH 0001 at {tuple(cfg.data.spacing)} mm {tuple(image.shape[1:])} " \
                      f"(preprocessed in {time.perf_counter() - t0:.1f} s)"
    shape = (256, 256, 160) if source == "nih" else tuple(int(v) for v in source.split(","))
    why = f" ({NIH_SCAN} not found)" if source == "nih" else ""
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(0)), f"random {shape}{why}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "cluster" / "full-size.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--amp", default="off,auto", help="comma list of off, auto, bf16, fp16")
    parser.add_argument("--compile", default="off,on", help="comma list of off, on")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--repeats", type=int, default=2, help="timed sliding-window passes per variant")
    parser.add_argument("--volume", default="nih", help="'nih' or X,Y,Z of a random volume")
    parser.add_argument("--budget-s", type=float, default=420.0, help="total time budget of the variants")
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU (small sizes)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device on this machine, nothing to measure (skipped); "
              "run it on a GPU node, or pass --allow-cpu for a small CPU dry run")
        return 0
    started = time.perf_counter()
    from dualssl.config import Config
    from dualssl.precision import amp_dtype as resolve_amp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config.load(args.config)
    if device.type == "cpu":
        cfg.with_overrides(dict(CPU_DRY_RUN))
        if args.volume == "nih":
            args.volume = "64,64,32"
    cfg.with_overrides(dict(kv.split("=", 1) for kv in args.set))
    cfg.validate()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest 3D kernels
    image, described = nih_volume(cfg, args.volume)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    patches = int(cfg.data.batch_size) * int(cfg.data.samples_per_volume)
    print(f"device {name}, torch {torch.__version__}; config {args.config.name}: widths {tuple(cfg.model.widths)}, "
          f"patch {tuple(cfg.data.patch_size)}, {patches} patches/step, sw batch {cfg.eval.sw_batch_size}, "
          f"overlap {cfg.eval.sw_overlap}; volume {described}", flush=True)

    variants = [(amp, comp == "on") for comp in args.compile.split(",") for amp in args.amp.split(",")]
    rows: list[tuple[str, dict[str, float] | str]] = []
    for i, (amp, compiled) in enumerate(variants):
        resolved = resolve_amp(amp, device)
        label = f"amp {str(resolved).replace('torch.', '') if resolved else 'off':8} compile {'on' if compiled else 'off'}"
        left = args.budget_s - (time.perf_counter() - started)
        share = left / (len(variants) - i)  # what is left, shared among the variants still to run
        result: dict[str, float] = {}
        try:
            with time_limit(share):
                result.update(train_variant(cfg, device, amp, compiled, args.steps))
                result.update(infer_variant(cfg, device, amp, compiled, image, args.repeats))
            rows.append((label, result))
        except OutOfTime:
            rows.append((label, result or f"skipped: past its {share:.0f} s of the time budget"))
        except torch.OutOfMemoryError as exc:
            rows.append((label, f"out of memory ({str(exc).splitlines()[0][:80]})"))
        except Exception as exc:  # e.g. a compile failure: report it, keep the other variants
            rows.append((label, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
        release(device)
        print(f"  {label}: {rows[-1][1] if isinstance(rows[-1][1], str) else 'done'} "
              f"({time.perf_counter() - started:.0f} s so far)", flush=True)

    cols = [("train_warm_s", "warm-up s", ".1f"), ("train_ms", "train ms", ".0f"), ("train_mvox", "train Mvox/s", ".2f"),
            ("train_gib", "train GiB", ".2f"), ("sw_warm_s", "sw warm-up s", ".1f"), ("sw_s", "sw s", ".2f"),
            ("sw_mvox", "sw Mvox/s", ".2f"), ("sw_gib", "sw GiB", ".2f")]
    header = f"{'variant':28}" + "".join(f"{title:>14}" for _, title, _ in cols)
    print("\n" + header)
    print("-" * len(header))
    for label, result in rows:
        if isinstance(result, str):
            print(f"{label:28}  {result}")
        else:
            print(f"{label:28}" + "".join(f"{result[k]:>14{fmt}}" if k in result else f"{'-':>14}"
                                          for k, _, fmt in cols))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
