"""Ray Train overhead: steps/s of a 1-worker ``TrialTorchTrainer`` run against ``engine.fit`` alone, same work.

    python benchmarks/ray_overhead.py [--epochs 6] [--steps 16] [--repeats 3] [--cpus 1] [--data ROOT]

Both sides run the same config, seed, data cache, torch threads and per-epoch checkpoint (the
engine's CheckpointSaver locally; ``ray.train.report`` with a checkpoint under Ray). Steady-state
steps/s counts the epochs after the first (timestamps at each epoch end, so the time between them
holds training, validation, reporting and checkpointing); end-to-end adds start-up (Ray worker
group, process group, data). Each side runs ``--repeats`` times, interleaved, and its fastest run
counts (other processes on a shared machine only ever slow a run down). Goal: ratio Ray/engine
>= 0.98 in steady state (Ray's own anchor: 0.975).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dualssl.config import Config  # noqa: E402
from dualssl.engine import Callback, CheckpointSaver, fit  # noqa: E402


class Stamp(Callback):
    """Adds ``t_end`` (wall clock at the end of the epoch) to the epoch's metrics."""

    def on_epoch_end(self, trainer, epoch, metrics, state_fn):
        metrics["t_end"] = time.time()


def ray_loop(config: dict) -> None:
    import ray.train.torch

    from studies.train_loop import RayReport, RayTrainer

    torch.set_num_threads(config["threads"])
    cfg = Config.from_dict(config["cfg"])
    fit(cfg, callbacks=[Stamp(), RayReport()], trainer_cls=RayTrainer, device=ray.train.torch.get_device())


def rates(stamps: list[float], steps: int, start: float) -> dict[str, float]:
    steady = steps * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"steady_steps_per_s": steady, "end_to_end_steps_per_s": steps * len(stamps) / (stamps[-1] - start)}


def run_engine(cfg: Config, threads: int, out: Path) -> dict[str, float]:
    torch.set_num_threads(threads)
    start = time.time()
    result = fit(cfg, callbacks=[Stamp(), CheckpointSaver(out)], device="cpu")
    return rates([h["t_end"] for h in result.history], cfg.optim.steps_per_epoch, start)


def run_ray(cfg: Config, threads: int, storage: Path) -> dict[str, float]:
    import ray
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchConfig

    import studies
    from studies.trainable import TrialTorchTrainer  # the trainer a study's trials run

    cloudpickle.register_pickle_by_value(studies)
    ray.init(address="local", num_cpus=threads, include_dashboard=False, log_to_driver=False)
    try:
        start = time.time()
        trainer = TrialTorchTrainer(
            ray_loop, train_loop_config={"cfg": cfg.to_dict(), "threads": threads},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(name="overhead", storage_path=str(storage),
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)))
        result = trainer.fit()
        stamps = sorted(m["t_end"] for _, m in result.best_checkpoints)
        return rates(stamps, cfg.optim.steps_per_epoch, start)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="dataset root (default: a small phantom in a temp dir)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cpus", type=int, default=1,
                   help="torch threads on both sides (and the Ray worker's CPU); more than 1 thread is "
                        "only meaningful on an otherwise idle machine")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved; the fastest counts")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)

    from dualssl.recipes import TINY

    with tempfile.TemporaryDirectory(prefix="dualssl-overhead-") as tmp:
        tmp = Path(tmp)
        root = args.data
        if root is None:
            from dualssl.data.phantom import generate_dataset

            root = generate_dataset(tmp / "phantom", sites=["pv_standard", "native_thick"], cases_per_site=5,
                                    seed=0, scale=0.3)
        cfg = Config()
        cfg.with_overrides(dict(TINY))
        # Whole-volume validation only after the last epoch: the steady state measures steps,
        # reporting and checkpointing, which is where Ray could cost something.
        cfg.with_overrides({"optim.epochs": args.epochs, "optim.steps_per_epoch": args.steps, "optim.lr": 1e-3,
                            "eval.val_every": args.epochs})
        cfg.data.root, cfg.data.cache_dir = str(root), str(tmp / "cache")
        warm = Config.from_dict(cfg.to_dict())
        warm.optim.epochs = 1
        fit(warm, device="cpu")  # fills the shared preprocessing cache, so neither side pays for it

        runs: dict[str, list[dict[str, float]]] = {"engine": [], "ray": []}
        for i in range(args.repeats):  # interleaved, so that load from other processes hits both sides
            runs["engine"].append(run_engine(cfg, args.cpus, tmp / f"engine{i}"))
            runs["ray"].append(run_ray(cfg, args.cpus, tmp / f"ray{i}"))
        engine = {k: max(r[k] for r in runs["engine"]) for k in runs["engine"][0]}
        ray_side = {k: max(r[k] for r in runs["ray"]) for k in runs["ray"][0]}
    import statistics

    median = {side: statistics.median(r["steady_steps_per_s"] for r in runs[side]) for side in runs}
    figures = {"engine": engine, "ray_1_worker": ray_side,
               "ratio_steady": ray_side["steady_steps_per_s"] / engine["steady_steps_per_s"],
               "ratio_steady_median": median["ray"] / median["engine"],
               "ratio_end_to_end": ray_side["end_to_end_steps_per_s"] / engine["end_to_end_steps_per_s"],
               "epochs": args.epochs, "steps_per_epoch": args.steps, "cpus": args.cpus, "runs": runs}
    print(f"{'':>22s} {'steady steps/s':>15s} {'end-to-end steps/s':>19s}")
    for name in ("engine", "ray_1_worker"):
        f = figures[name]
        print(f"{name:>22s} {f['steady_steps_per_s']:15.3f} {f['end_to_end_steps_per_s']:19.3f}")
    print(f"{'ratio Ray / engine':>22s} {figures['ratio_steady']:15.3f} {figures['ratio_end_to_end']:19.3f}"
          f"   (goal >= 0.98 steady)")
    print(f"{'median-run ratio':>22s} {figures['ratio_steady_median']:15.3f}   over {args.repeats} runs a side")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
