"""Ray Train's floor for worker-group start-up: a Tune trial whose TorchTrainer loop does nothing.

    python benchmarks/worker_startup.py [--repeats 4] [--workers 2] [--out FILE.json]

A default trial reports ``time/startup_workers_s`` (``studies/throughput.py``): from the trial
function's start to rank 0 entering the train loop. This benchmark times the same span for a loop
that only imports torch, in the same kind of trial (a Tune function trainable calling
``TorchTrainer.fit()``, gloo, N workers of 1 CPU), so that a study's figure can be read against it:
whatever a real trial spends above the floor is ours (config, imports of the train loop), the floor
itself is Ray's (the controller, the worker processes, their imports of ray.train and torch, the
synchronisation and placement-group cleaner actors Ray Train V2 starts per run; the stock trainer
also starts a dataset-manager actor and sends every worker the Ray Data context).

Variants, interleaved in rotated order with a pause between trials so that one trial's shutdown
does not slow the next, both with ``TuneReportCallback`` in the Train ``RunConfig`` as in
``studies/trainable.py``: ``dualssl`` (its ``TrialTorchTrainer``, which drops Ray Data's per-run
plumbing when there are no datasets) and ``ray-stock`` (Ray's ``TorchTrainer``). Prints the median
and the fastest of each, and the median of the per-repeat differences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no experiment banner per trial (read when Tune starts)

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies.trainable import TrialTorchTrainer  # noqa: E402

VARIANTS = ("dualssl", "ray-stock")


def empty_loop(config: dict) -> None:
    """Rank 0 writes the moment it entered the loop (after torch is imported, as a real loop needs)."""
    import torch  # noqa: F401

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["mark"]).write_text(repr(time.time()))


def trial(config: dict) -> None:
    started = time.time()
    run = f"empty-{time.time_ns()}"
    mark = Path(config["storage"]) / f"{run}.entered"
    trainer = (TrialTorchTrainer if config["variant"] == "dualssl" else TorchTrainer)(
        empty_loop, train_loop_config={"mark": str(mark)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=config["workers"], resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=run, storage_path=config["storage"],
                                       callbacks=[TuneReportCallback()]))
    trainer.fit()
    tune.report({"startup_workers_s": float(mark.read_text()) - started})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pause", type=float, default=5.0, help="seconds between trials")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    storage = tempfile.mkdtemp(prefix="worker-startup-")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rotations = [VARIANTS[rep % 2:] + VARIANTS[:rep % 2] for rep in range(args.repeats)]
    # repeat -1 warms the cluster (its first Train run also creates Ray's autoscaling coordinator): not counted
    schedule = [(-1, VARIANTS[0])] + [(rep, v) for rep, order in enumerate(rotations) for v in order]
    for rep, variant in schedule:
        time.sleep(args.pause)
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 0, "memory": 256 * 1024**2}),
            param_space={"variant": variant, "storage": storage, "workers": args.workers},
            run_config=tune.RunConfig(storage_path=storage, name=f"{variant}-{rep}", verbose=0))
        (result,) = tuner.fit()
        if result.error:
            raise result.error
        value = result.metrics["startup_workers_s"]
        print(f"{variant:12s} repeat {rep}: {value:.2f} s{' (warm-up, not counted)' if rep < 0 else ''}", flush=True)
        if rep >= 0:
            times[variant].append(value)
    print(f"\nworker-group start-up of an empty {args.workers}-worker trial (trial start -> rank 0 in the loop):")
    summary = {}
    for variant, values in times.items():
        summary[variant] = {"median_s": statistics.median(values), "min_s": min(values), "all_s": values}
        print(f"  {variant:12s} median {summary[variant]['median_s']:.2f} s   fastest {min(values):.2f} s")
    saved = [stock - ours for ours, stock in zip(times["dualssl"], times["ray-stock"])]
    summary["saved_by_dualssl_s"] = {"median_s": statistics.median(saved), "all_s": saved}
    print(f"  ray-stock - dualssl, per repeat: median {statistics.median(saved):.2f} s "
          f"({', '.join(f'{d:.2f}' for d in saved)})")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
