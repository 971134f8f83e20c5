"""Where a study's trial time goes: training steps, validation, checkpoints, start-up, evaluation.

Runs ``studies/tune.py`` (the default study unless tune.py flags follow ``--``) into a fresh
storage folder, or reads a finished study with ``--study``, and prints, per trial and in all, the
time in each phase of ``studies/throughput.py`` as a fraction of trial wall time, plus trials per
hour of study wall time, and (when it runs the study) the peak memory of the study's whole process
tree as the sum of PSS (benchmarks/tree_memory.py)::

    python benchmarks/study_throughput.py --out /tmp/throughput
    python benchmarks/study_throughput.py --out /tmp/throughput -- --smoke-test
    python benchmarks/study_throughput.py --study /tmp/throughput/dualssl_study

Completed trials carry the exact breakdown in their final result (``time/*``, also in MLflow).
Trials that ASHA stopped end without one: their phases are estimated from the per-epoch results
(train, validation and start-up exact, as every epoch carries the trial's start; the rest as
other), and the driver's evaluation of them (``eval_wait_s`` in ``trials.json``; they run side by
side) is listed apart.
Writes ``throughput.json`` into the study folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies.throughput import PHASES, epoch_breakdown, study_fractions  # noqa: E402


def read_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_breakdowns(study_dir: Path) -> tuple[list[dict], dict]:
    """``([{trial_id, status, time/...}], manifest)`` of a finished study folder."""
    manifest = json.loads((study_dir / "study.json").read_text())
    rows = {r["trial_id"]: r for r in json.loads((study_dir / "trials.json").read_text())}
    experiment_dir = Path(manifest["storage"]) / manifest["experiment"]
    out = []
    for trial_dir in sorted(experiment_dir.glob("trial_*")):
        results = read_results(trial_dir)
        if not results:
            continue
        trial_id = trial_dir.name.removeprefix("trial_")
        final = results[-1]
        if "time/trial_s" in final:
            times = {k: v for k, v in final.items() if k.startswith("time/")}
            source = "final result"
        else:
            times = epoch_breakdown(results)
            source = "estimated from epochs"
        row = rows.get(trial_id, {})
        out.append({"trial_id": trial_id, "status": row.get("status", "?"), "source": source,
                    "driver_eval_s": row.get("eval_wait_s"), **times})
    return out, manifest


def format_table(trials: list[dict], manifest: dict) -> str:
    head = f"{'trial':>12s} {'status':>20s} {'wall s':>7s} " + " ".join(f"{p:>10s}" for p in PHASES) + "  steps/s"
    lines = [head]
    for t in trials:
        total = t.get("time/trial_s", 0.0) or 0.0
        fracs = " ".join(f"{t.get(f'time/{p}_s', 0.0) / total if total else 0.0:10.3f}" for p in PHASES)
        rate = t.get("time/steps", 0.0) / t["time/train_s"] if t.get("time/train_s") else float("nan")
        lines.append(f"{t['trial_id']:>12s} {t['status'][:20]:>20s} {total:7.1f} {fracs}  {rate:7.2f}")
    summed = study_fractions(trials)
    lines.append(f"{'all':>12s} {'':>20s} {summed['trial_s']:7.1f} "
                 + " ".join(f"{summed[f'{p}_frac']:10.3f}" for p in PHASES))
    split = [t for t in trials if "time/startup_workers_s" in t]
    if split:
        workers = [t["time/startup_workers_s"] for t in split]
        mean, most = sum(workers) / len(workers), max(workers)
        setup = sum(t["time/startup_setup_s"] for t in split) / len(split)
        lines.append(f"start-up of a trial (mean of {len(split)}): {mean:.1f} s to rank 0's train loop "
                     f"(max {most:.1f} s; Train controller, worker group, process group, imports) "
                     f"+ {setup:.1f} s of set-up (data, model, DDP) to the first step")
        completed = [t["time/trial_s"] for t in trials if t["source"] == "final result"]
        if completed:
            full = sum(completed) / len(completed)
            lines.append(f"  as a share of a completed trial ({full:.1f} s): {mean / full:.1%} mean, "
                         f"{most / full:.1%} max")
    wall = float(manifest.get("wall_time_s") or 0.0)
    driver = sum(t.get("driver_eval_s") or 0.0 for t in trials)
    lines.append(f"study wall time {wall:.0f} s; {len(trials)} trials -> {len(trials) / wall * 3600:.1f} trials/hour; "
                 f"driver evaluation of stopped trials {driver:.0f} s (side by side)" if wall else "no wall time")
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    tune_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/dualssl_throughput"),
                        help="storage folder of the study this runs")
    parser.add_argument("--study", type=Path, help="read this finished study folder instead of running one")
    args = parser.parse_args(argv)
    study_dir, peak = args.study, {}
    if study_dir is None:
        start = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "studies" / "tune.py"), "--storage-path", str(args.out), *tune_args]
        print("$ " + " ".join(cmd), flush=True)
        from tree_memory import TreeMemory

        proc = subprocess.Popen(cmd, cwd=ROOT)
        with TreeMemory(proc.pid) as memory:
            if proc.wait() != 0:
                raise SystemExit(f"the study failed ({proc.returncode})")
        print(f"[throughput] study finished in {time.perf_counter() - start:.0f} s; peak memory (sum of PSS of "
              f"its process tree, sampled every second) {memory.peak_gib:.2f} GiB over {memory.peak_processes} "
              "processes", flush=True)
        peak = {"peak_pss_gib": memory.peak_gib, "peak_processes": memory.peak_processes}
        study_dir = max((p.parent for p in args.out.glob("*/study.json")), key=lambda p: p.stat().st_mtime)
    trials, manifest = trial_breakdowns(study_dir)
    print(format_table(trials, manifest))
    (study_dir / "throughput.json").write_text(json.dumps({"trials": trials, "all": study_fractions(trials),
                                                           "wall_time_s": manifest.get("wall_time_s"), **peak}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
