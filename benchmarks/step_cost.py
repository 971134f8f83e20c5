"""Cost of the dual-SSL branches: time per training step, full model vs both lambdas 0, side by side.

One step is the engine's protocol (``Trainer.train_step``): forward of the clean patch (segmentation
+ contrastive), corrupt a crop around the band (``loss.rec_crop``), forward of that crop
(restoration only), loss, backward, Adam step, on the same synthetic batch (a smooth noisy image
with a curved, pancreas-like label blob) for every variant. Runs are interleaved (ABBA order) after
a warm-up, and the medians compared. Goal: ratio <= 1.25 on CPU.

``--backends device,reference`` times the dual-SSL step with the label-side work (contrastive
sampling, voxel selection, corruption) on the device without host round trips (``device``, the
default) and with the original host-side code (``reference``: NumPy/scikit-image sampling, voxel
lists by ``nonzero``), side by side. ``--compile`` adds a ``torch.compile``d twin of every dual-SSL
variant (the model's forwards, as ``optim.compile`` does; compilation happens in the warm-up and
is timed apart) and reports compiled / eager.

    python benchmarks/step_cost.py                       # widths 8,16,32,64, patch 96x96x64, batch 2
    python benchmarks/step_cost.py --rec-crops 1,0.75,0.5 --repeats 9 --device cuda
    python benchmarks/step_cost.py --backends device,reference --compile --patch 64,64,32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from dualssl.config import LossConfig, ModelConfig
from dualssl.losses import DualSSLLoss
from dualssl.models import build_model


def pancreas_like_batch(batch: int, patch: tuple[int, int, int], spacing: tuple[float, float, float],
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image (B, 1, X, Y, Z) in [0, 1], label (B, 1, X, Y, Z) in {0, 1})``.

    The label is a tube 8-12 mm in radius around a bent centreline (head to tail across the
    patch, rising a little towards the tail), ~40-60 ml when the patch holds all of it.
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    sx, sy, sz = patch
    for _ in range(batch):
        t = np.linspace(0, 1, 200)
        bend = rng.uniform(0.15, 0.3)
        cx = (0.15 + 0.7 * t) * sx
        cy = (0.5 + bend * np.sin(np.pi * t) - bend / 2 + rng.uniform(-0.05, 0.05)) * sy
        cz = (0.4 + 0.2 * t) * sz
        line = np.zeros(patch, bool)
        line[np.clip(cx.astype(int), 0, sx - 1), np.clip(cy.astype(int), 0, sy - 1),
             np.clip(cz.astype(int), 0, sz - 1)] = True
        dist, (ix, _, _) = ndimage.distance_transform_edt(~line, sampling=spacing, return_indices=True)
        radius = 8.0 + 4.0 * (1 - ix / sx)  # thicker head, thinner tail
        label = dist <= radius
        image = ndimage.gaussian_filter(rng.normal(0.45, 0.1, patch), 1.0) + 0.2 * label
        images.append(np.clip(image, 0, 1))
        labels.append(label)
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32))  # noqa: E731
    return as_tensor(images), as_tensor(labels)


class Variant:
    """A model, its optimizer and its loss for one loss configuration (``backend`` of the loss,
    ``compiled``: the forwards go through ``torch.compile(net, dynamic=False)`` as in ``Trainer.setup``)."""

    def __init__(self, net: torch.nn.Module, loss_cfg: LossConfig, spacing: tuple[float, float, float],
                 backend: str = "device", compiled: bool = False) -> None:
        self.net = net
        self.model = torch.compile(net, dynamic=False) if compiled else net
        self.cfg = loss_cfg
        self.loss = DualSSLLoss(loss_cfg, spacing, backend=backend)  # type: ignore[arg-type]
        self.opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=5e-4)

    def step(self, image: torch.Tensor, label: torch.Tensor, device: torch.device) -> dict[str, float]:
        """One training step; returns the wall and CPU seconds of its stages."""
        clocks = [(time.perf_counter(), time.process_time())]

        def tick() -> None:
            _sync(device)
            clocks.append((time.perf_counter(), time.process_time()))

        outputs = self.model(image, embeddings=self.cfg.contrastive_on)
        tick()
        corrupted = self.loss.corrupt(image, label)
        tick()
        rec_outputs = self.model(corrupted.image, restoration=True) if corrupted is not None else None
        tick()
        parts = self.loss(outputs, label, rec_outputs, corrupted)
        tick()
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.opt.step()
        tick()
        self.last_parts = {k: float(v.detach()) for k, v in parts.items()}
        names = ("forward", "corrupt", "forward rec", "loss", "backward+adam")
        out = {f"{n} wall": clocks[i + 1][0] - clocks[i][0] for i, n in enumerate(names)}
        out.update({f"{n} cpu": clocks[i + 1][1] - clocks[i][1] for i, n in enumerate(names)})
        out["step wall"] = clocks[-1][0] - clocks[0][0]
        out["step cpu"] = clocks[-1][1] - clocks[0][1]
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="8,16,32,64")
    parser.add_argument("--patch", default="96,96,64")
    parser.add_argument("--spacing", default="1.5,1.5,2.0")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rec-crops", default=str(LossConfig().rec_crop),
                        help="comma-separated loss.rec_crop values, one dual-SSL variant each")
    parser.add_argument("--backends", default="device",
                        help="comma-separated loss backends of the dual-SSL variants: device, reference")
    parser.add_argument("--compile", action="store_true",
                        help="add a torch.compile'd twin of every dual-SSL variant and report compiled / eager")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    patch = tuple(int(v) for v in args.patch.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    image, label = (t.to(device) for t in pancreas_like_batch(args.batch, patch, spacing))  # type: ignore[arg-type]
    net = build_model(ModelConfig(widths=tuple(int(w) for w in args.widths.split(",")))).to(device)
    plain = "plain (lambdas 0)"
    variants = {plain: Variant(net, LossConfig(lambda_con=0.0, lambda_rec=0.0), spacing)}
    backends = args.backends.split(",")
    twins: dict[str, str] = {}  # compiled variant -> its eager twin
    other_backend: dict[str, str] = {}  # variant -> the same recipe with the first backend
    for crop in (float(c) for c in args.rec_crops.split(",")):
        for backend in backends:
            name = f"dual rec_crop={crop:g}" + (f" {backend}" if len(backends) > 1 else "")
            variants[name] = Variant(copy.deepcopy(net), LossConfig(rec_crop=crop), spacing, backend=backend)
            if backend != backends[0]:
                other_backend[name] = f"dual rec_crop={crop:g} {backends[0]}"
            if args.compile:
                twins[f"{name} compiled"] = name
                variants[f"{name} compiled"] = Variant(copy.deepcopy(net), LossConfig(rec_crop=crop), spacing,
                                                       backend=backend, compiled=True)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    warmup: dict[str, float] = {}
    for name in names:  # warm-up (allocator, kernels, first skeletonize, compilation): two steps
        start = time.perf_counter()
        for _ in range(2):
            variants[name].step(image, label, device)
        warmup[name] = time.perf_counter() - start
    for i in range(args.repeats):
        for name in names if i % 2 == 0 else names[::-1]:  # ABBA: drifts in machine load hit all alike
            times[name].append(variants[name].step(image, label, device))
            print(f"  repeat {i}: {name} step wall {times[name][-1]['step wall']:.2f} s", flush=True)
    print(f"device {device}, threads {torch.get_num_threads()}, widths {args.widths}, patch {patch}, "
          f"batch {args.batch}, {args.repeats} interleaved repeats (medians, seconds)")
    for name in names[1:]:
        counts = tuple(int(c) for c in variants[name].loss.last_counts)
        print(f"{name}: loss parts of the last step {variants[name].last_parts}; contrastive samples "
              f"(pos, neg) = {counts}")
    print("  warm-up (2 steps, compilation included), wall s: "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in warmup.items()))
    keys = list(times[names[0]][0])
    width = max(20, max(len(n) for n in names) + 2)
    print(f"  {'stage':18s}" + "".join(f"{name:>{width}s}" for name in names))
    med = {name: {k: statistics.median(t[k] for t in times[name]) for k in keys} for name in names}
    for k in keys:
        print(f"  {k:18s}" + "".join(f"{med[name][k]:{width}.3f}" for name in names))
    for name in names:
        walls = ", ".join(f"{t['step wall']:.2f}" for t in times[name])
        print(f"  every step wall, {name}: {walls}")
    ratios = {}
    for name in names[1:]:
        ratios[name] = med[name]["step wall"] / med[plain]["step wall"]
        ratio_cpu = med[name]["step cpu"] / med[plain]["step cpu"]
        print(f"ratio {name} / plain = {ratios[name]:.3f} wall-clock, {ratio_cpu:.3f} CPU time  (goal <= 1.25)")
    for name, base in other_backend.items():
        ratios[f"{name} / {base}"] = med[name]["step wall"] / med[base]["step wall"]
        print(f"ratio {name} / {base} = {ratios[f'{name} / {base}']:.3f} wall-clock, "
              f"{med[name]['step cpu'] / med[base]['step cpu']:.3f} CPU time")
    for compiled, eager in twins.items():
        ratios[f"{compiled} / eager"] = med[compiled]["step wall"] / med[eager]["step wall"]
        print(f"ratio {compiled} / eager = {ratios[f'{compiled} / eager']:.3f} wall-clock, "
              f"{med[compiled]['step cpu'] / med[eager]['step cpu']:.3f} CPU time  (< 1: compile is faster)")
    return ratios


if __name__ == "__main__":
    main()
