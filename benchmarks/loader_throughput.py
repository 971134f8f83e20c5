"""Does the training loader keep up with the training step? Patches/s of both, side by side.

For each dataset (a small phantom generated here, and the real NIH Pancreas-CT scan
``shared/data/real/nih_pancreas_ct_0001``: Roth et al., TCIA 2016, doi:10.7937/K9/TCIA.2016.tNB1kqBU,
CC BY) and each ``data.num_workers`` it measures, on the recipe's config (default
``dualssl.recipes.SCALES["demo"]``):

* **cold**: ``build_data`` on an empty cache folder, then one epoch of ``optim.steps_per_epoch``
  batches through the engine's own batch stream (``Trainer.epoch_batches``): every training volume is
  preprocessed once on its first use (the first epoch of a study's first trial);
* **warm**: the same stream once the cache files exist (every later epoch and trial);
* **step**: ``Trainer.train_step`` alone on batches already in memory (what training consumes);
* **loop**: ``Trainer.train_epoch``, i.e. loader and step together, as training runs them.

Warm loader, step and loop are timed in interleaved rounds (loader, step, loop, loader, ...) and the
medians reported. ``ratio`` = warm loader patches/s / step patches/s (goal >= 2: the loader is not the
bottleneck, even on 2 cores where loader workers and the step share the CPU); ``stall`` = loop time /
step time - 1 (the share of the loop spent waiting for data, or slowed by workers competing for cores).

The NIH list names the one scan twice (``nih_0001`` trains, ``nih_0001_v`` validates: a split needs
a validation case); both rows point at the same files and so share one cache entry.

``--augment-cost smoke,demo,learning`` instead prices the standard augmentation
(``data.augment``, nnU-Net's default: ``dualssl.data.transforms.standard_augmentation``) on each CPU
recipe: two trainers on the same warm cache, one with ``data.augment=true`` and one with ``false``,
run whole training epochs (loader + step, ``Trainer.train_epoch``) in ABBA order; the medians and
their ratio on / off are printed per recipe (and the warm loader alone, for the augmentation's own cost).

    python benchmarks/loader_throughput.py                       # phantom + NIH, workers 0,1,2
    python benchmarks/loader_throughput.py --datasets phantom --workers 0,2 --rounds 5
    python benchmarks/loader_throughput.py --augment-cost smoke,demo,learning --rounds 4 --steps 8 --threads 1

Measured 7 December on the 2-core machine, 5 phantom cases at scale 0.5, 8 batches an epoch, 4 rounds.
Quiet (load 0.9), wall seconds an epoch off -> on: smoke 1.40 -> 1.48 (x1.06), demo 3.85 -> 3.98
(x1.03), learning 5.82 -> 6.10 (x1.05); the warm loader alone 0.31 -> 0.39, 0.32 -> 0.43, 0.49 -> 0.66 s
(about 5-7 ms a patch). Under load 20-43 from other jobs, CPU seconds x1.10, x1.03, x1.05.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dualssl.config import Config  # noqa: E402
from dualssl.data.loaders import build_data  # noqa: E402
from dualssl.engine.fit import Trainer  # noqa: E402
from dualssl.recipes import recipe_config  # noqa: E402

NIH_CASE = Path("real") / "nih_pancreas_ct_0001"


class QuietTrainer(Trainer):
    """The engine's Trainer without a progress bar (the benchmark times steps, not epochs)."""

    progress = False


def phantom_root(tmp: Path, cases: int, scale: float) -> tuple[Path, list[str]]:
    from dualssl.data.phantom import generate_dataset

    root = generate_dataset(tmp / "phantom", sites=["pv_standard"], cases_per_site=cases, seed=0, scale=scale)
    return Path(root), ["pv_standard"]


def nih_list(tmp: Path, data: Path) -> tuple[Path, list[str]]:
    folder = data / NIH_CASE
    image, label = folder / "ct.nii.gz", folder / "pancreas.nii.gz"
    if not image.is_file() or not label.is_file():
        raise FileNotFoundError(f"{folder}: NIH case not found; pass --data pointing at shared/data")
    path = tmp / "nih.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "label", "site"])
        writer.writerow(["nih_0001", str(image), str(label), "nih"])
        writer.writerow(["nih_0001_v", str(image), str(label), "nih"])
    return path, ["nih"]


def patches_per_batch(cfg: Config) -> int:
    return int(cfg.data.batch_size) * int(cfg.data.samples_per_volume)


def count_patches(batches: list[dict[str, Any]]) -> int:
    return sum(int(b["image"].shape[0]) for b in batches)


def time_cold(cfg: Config, cache: Path) -> tuple[float, int]:
    """Seconds and patches of ``build_data`` + one epoch's batches on an empty cache."""
    cfg.data.cache_dir = str(cache)
    trainer = QuietTrainer(cfg, device="cpu")
    start = time.perf_counter()
    trainer.data = build_data(cfg.data)
    trainer.train_loader = trainer.data.train_loader
    n = 0
    for batch in trainer.epoch_batches(0):
        n += int(batch["image"].shape[0])
    return time.perf_counter() - start, n


def measure(cfg: Config, rounds: int) -> dict[str, float]:
    """Interleaved rounds of warm loader, step alone and loop; medians in seconds per epoch."""
    trainer = QuietTrainer(cfg, device="cpu")
    trainer.setup()
    held = list(trainer.epoch_batches(0))  # also starts persistent workers and warms the page cache
    trainer.train_step(held[0])  # first step: allocator and kernel warm-up
    loader_s, step_s, loop_s = [], [], []
    patches = count_patches(held)
    for r in range(rounds):
        t0 = time.perf_counter()
        n = sum(int(b["image"].shape[0]) for b in trainer.epoch_batches(r + 1))
        loader_s.append(time.perf_counter() - t0)
        assert n == patches, (n, patches)
        t0 = time.perf_counter()
        for batch in held:
            trainer.train_step(batch)
        step_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.train_epoch(rounds + r + 1)
        loop_s.append(time.perf_counter() - t0)
    del trainer
    return {"patches": patches, "loader": statistics.median(loader_s), "step": statistics.median(step_s),
            "loop": statistics.median(loop_s)}


def augment_cost(recipe: str, root: Path, sites: list[str], cache: Path, steps: int, rounds: int,
                 overrides: dict[str, str]) -> dict[str, float]:
    """Seconds per epoch of ``recipe`` with the standard augmentation on and off, interleaved (ABBA).

    Both trainers read the same warm cache and run the same number of batches; returns the medians
    ``loop_on``, ``loop_off``, ``loader_on``, ``loader_off`` (wall seconds per epoch), ``cpu_on``,
    ``cpu_off`` (this process's CPU seconds per epoch: steadier than wall time on a shared machine;
    ``data.num_workers`` 0, the CPU recipes' value, keeps the loader in this process) and ``patches``.
    """
    trainers = {}
    for on in (True, False):
        cfg = recipe_config(recipe)
        cfg.with_overrides({"data.root": str(root), "data.source_sites": sites, "data.cache_dir": str(cache),
                            "optim.steps_per_epoch": steps, **overrides, "data.augment": on})
        cfg.validate()
        trainer = QuietTrainer(cfg, device="cpu")
        trainer.setup()
        trainer.train_epoch(0)  # fills the cache (first trainer), warms allocator and kernels
        trainers[on] = trainer
    loop: dict[bool, list[float]] = {True: [], False: []}
    loader: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    patches = 0
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            patches = sum(int(b["image"].shape[0]) for b in trainers[on].epoch_batches(r + 1))
            loader[on].append(time.perf_counter() - t0)
            t0, c0 = time.perf_counter(), time.process_time()
            trainers[on].train_epoch(r + 1)
            loop[on].append(time.perf_counter() - t0)
            cpu[on].append(time.process_time() - c0)
    med = statistics.median
    return {"patches": patches, "loop_on": med(loop[True]), "loop_off": med(loop[False]),
            "cpu_on": med(cpu[True]), "cpu_off": med(cpu[False]),
            "loader_on": med(loader[True]), "loader_off": med(loader[False])}


def print_augment_cost(recipes: list[str], args: argparse.Namespace) -> int:
    """``--augment-cost``: the standard augmentation's cost per CPU recipe, on the phantom."""
    overrides = dict(kv.split("=", 1) for kv in args.set)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualssl-augment-") as tmp_name:
        tmp = Path(tmp_name)
        root, sites = phantom_root(tmp, args.phantom_cases, args.phantom_scale)
        for recipe in recipes:
            m = augment_cost(recipe, root, sites, tmp / f"cache-{recipe}", args.steps, args.rounds, overrides)
            rows.append((recipe, m))
            print(f"  {recipe}: epoch {m['loop_off']:.2f} s off, {m['loop_on']:.2f} s on", flush=True)
    print(f"\nstandard augmentation on vs off, phantom ({args.phantom_cases} cases, scale {args.phantom_scale}), "
          f"{args.steps} batches/epoch, {args.rounds} rounds ABBA; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    header = f"{'recipe':9} {'patches':>7} {'epoch off s':>11} {'epoch on s':>10} {'on/off':>7} " \
             f"{'cpu off s':>9} {'cpu on s':>8} {'on/off':>7} {'loader off s':>12} {'loader on s':>11}"
    print(header)
    print("-" * len(header))
    for recipe, m in rows:
        print(f"{recipe:9} {m['patches']:>7} {m['loop_off']:>11.2f} {m['loop_on']:>10.2f} "
              f"{m['loop_on'] / m['loop_off']:>7.3f} {m['cpu_off']:>9.2f} {m['cpu_on']:>8.2f} "
              f"{m['cpu_on'] / m['cpu_off']:>7.3f} {m['loader_off']:>12.2f} {m['loader_on']:>11.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo", help="dualssl.recipes name (default demo)")
    parser.add_argument("--datasets", default="phantom,nih", help="comma list of phantom, nih")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", default="0,1,2", help="data.num_workers values to try")
    parser.add_argument("--steps", type=int, default=12, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--phantom-cases", type=int, default=5)
    parser.add_argument("--phantom-scale", type=float, default=0.5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--augment-cost", default="", metavar="RECIPES",
                        help="comma list of recipes: time epochs with data.augment on vs off instead")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.augment_cost:
        return print_augment_cost(args.augment_cost.split(","), args)

    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualssl-loader-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.datasets.split(","):
            t0 = time.perf_counter()
            root, sites = phantom_root(tmp, args.phantom_cases, args.phantom_scale) if name == "phantom" \
                else nih_list(tmp, args.data)
            if name == "phantom":
                print(f"phantom: {args.phantom_cases} cases at scale {args.phantom_scale} in "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
            for w in workers:
                cfg = recipe_config(args.recipe)
                cfg.with_overrides({"data.root": str(root), "data.source_sites": sites, "data.num_workers": w,
                                    "optim.steps_per_epoch": args.steps,
                                    **dict(kv.split("=", 1) for kv in args.set)})
                cfg.validate()
                cold_s, cold_n = time_cold(cfg, tmp / f"cache-{name}-{w}")
                m = measure(cfg, args.rounds)
                p = m["patches"]
                row = {"data": name, "workers": w, "cold": cold_n / cold_s, "warm": p / m["loader"],
                       "step": p / m["step"], "loop": p / m["loop"]}
                row["ratio"] = row["warm"] / row["step"]
                row["stall"] = m["loop"] / m["step"] - 1.0
                rows.append(row)
                print(f"  {name} workers={w}: cold {row['cold']:.1f}, warm {row['warm']:.1f}, step {row['step']:.1f}, "
                      f"loop {row['loop']:.1f} patches/s", flush=True)

    cfg = recipe_config(args.recipe)
    print(f"\nrecipe {args.recipe}: patch {tuple(cfg.data.patch_size)}, spacing {tuple(cfg.data.spacing)} mm, "
          f"{patches_per_batch(cfg)} patches/batch, widths {tuple(cfg.model.widths)}, augment {cfg.data.augment}; "
          f"{args.steps} batches/epoch, {args.rounds} interleaved rounds; torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    header = f"{'data':8} {'workers':>7} {'cold p/s':>9} {'warm p/s':>9} {'step p/s':>9} {'loop p/s':>9} " \
             f"{'warm/step':>9} {'stall':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['data']:8} {r['workers']:>7} {r['cold']:>9.1f} {r['warm']:>9.1f} {r['step']:>9.2f} "
              f"{r['loop']:>9.2f} {r['ratio']:>9.1f} {r['stall']:>+7.0%}")
    for name in dict.fromkeys(r["data"] for r in rows):
        best = max((r for r in rows if r["data"] == name), key=lambda r: r["loop"])
        print(f"{name}: fastest loop with data.num_workers={best['workers']} ({best['loop']:.2f} patches/s); "
              f"warm loader / step = {best['ratio']:.1f} (goal >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
