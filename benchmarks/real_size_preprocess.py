"""Real-size preprocessing, side by side: today's lazy path vs the study's one pass before the trials.

Writes a phantom (default scale 1.0 = clinical size, 4 sites x 10 cases; the phantom is a test fixture,
not evidence about real hospitals), fingerprints it (``dualssl.data.fingerprint``, processes) and plans
it (``--plan auto``'s rule), then runs two arms on the same data, each from an empty cache, with a
private Ray head up in both (a study has one either way):

- **lazy** (today): ``--consumers`` trial-like processes start at once; each builds the data as a
  trial does (``dualssl.data.loaders.build_data``: the shared on-disk cache filled on first touch),
  takes its first training batch (its "first training step") and then reads every training and
  validation volume once (the rest of its first epoch's data);
- **one pass**: ``studies/preprocess.py``'s pass (one Ray task per case over ``--pass-cpus`` CPUs)
  fills the cache, then the same consumers start and only read.

Per arm: wall time from the arm's start to the first batch of the LAST consumer and to every consumer
having read every case, CPU seconds (pass tasks + consumer processes; a consumer's CPU includes its
reading and patch sampling, so the lazy minus one-pass consumer CPU is the repeated preprocessing),
cache files written, and the peak memory of the process tree (summed PSS, ``tree_memory.py``).
Then the cross-site evaluation time of one full-size test case (``Predictor.predict_file`` with the
``--eval-config`` network, untrained: the time does not depend on the weights), and the NIH scan in
``../shared/data`` through the fingerprint and the preprocessing::

    python benchmarks/real_size_preprocess.py --scale 0.5 --cases-per-site 4     # a quick look
    python benchmarks/real_size_preprocess.py                                     # real size (long)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from tree_memory import TreeMemory  # noqa: E402

SITES = "pv_standard,native_thick,lowdose_sharp,cone_beam"


def consume(cfg, t0: float, out: "mp.Queue") -> None:
    """One trial-like consumer: build the data, first training batch, then read every volume once."""
    import torch

    torch.set_num_threads(1)
    from dualssl.data.loaders import build_data

    cpu0 = time.process_time()
    bundle = build_data(cfg.data)
    next(iter(bundle.train_loader))
    first = time.time() - t0
    volumes = bundle.train_loader.dataset.data  # the cached volumes under the random patch transform
    for i in range(len(volumes)):
        volumes[i]
    for i in range(len(bundle.val_volumes)):
        bundle.val_volumes[i]
    out.put({"first_step_s": first, "all_read_s": time.time() - t0, "cpu_s": time.process_time() - cpu0})


def run_consumers(cfg, n: int, t0: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=consume, args=(cfg, t0, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a consumer failed (exit {p.exitcode})")
    return results


def arm(name: str, cfg, consumers: int, one_pass: bool) -> dict:
    from dualssl.data.cache import cache_dir_for

    folder = cache_dir_for(cfg.data)
    shutil.rmtree(folder, ignore_errors=True)
    result: dict = {"arm": name}
    with TreeMemory(os.getpid()) as mem:
        t0 = time.time()
        pass_cpu = 0.0
        if one_pass:
            from studies.preprocess import preprocess_pass

            done = preprocess_pass([cfg], [cfg.data.source_sites])
            pass_cpu = done.cpu_s
            result["pass_wall_s"] = round(done.wall_s, 1)
        rows = run_consumers(cfg, consumers, t0)
    result.update(
        first_step_last_s=round(max(r["first_step_s"] for r in rows), 1),
        all_read_s=round(max(r["all_read_s"] for r in rows), 1),
        pass_cpu_s=round(pass_cpu, 1), consumer_cpu_s=round(sum(r["cpu_s"] for r in rows), 1),
        files=len(list(folder.glob("*.pt"))), peak_gib=round(mem.peak_gib, 2))
    result["total_cpu_s"] = round(result["pass_cpu_s"] + result["consumer_cpu_s"], 1)
    print(f"[bench] {name}: {result}", flush=True)
    return result


def eval_time(cfg_path: Path, case, scale_note: str) -> dict:
    import torch

    from dualssl.config import Config
    from dualssl.evaluation.inference import Predictor
    from dualssl.models import SegmentationNet, build_model

    cfg = Config.load(cfg_path).validate()
    model = SegmentationNet(build_model(cfg.model)).eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    predictor = Predictor(model, cfg)
    t = time.time()
    predictor.predict_file(case.image)
    return {"case": case.case_id, "site": case.site, "seconds": round(time.time() - t, 1), "config": str(cfg_path),
            "note": scale_note}


def nih(path: Path, cache: Path) -> dict | None:
    from dualssl.config import Config
    from dualssl.data.cache import ensure_cached
    from dualssl.data.datalist import Case
    from dualssl.data.fingerprint import case_fingerprint

    image, label = path / "ct.nii.gz", path / "pancreas.nii.gz"
    if not image.is_file():
        return None
    case = Case("nih_0001", str(image), str(label), "nih")
    t = time.time()
    fp = case_fingerprint(case)
    fp_s = time.time() - t
    cfg = Config()
    cpu, t = time.process_time(), time.time()
    ensure_cached(case, cfg.data, cache)
    row = fp.row()
    return {"fingerprint": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
            "fingerprint_s": round(fp_s, 1), "preprocess_s": round(time.time() - t, 1),
            "preprocess_cpu_s": round(time.process_time() - cpu, 1), "spacing": list(cfg.data.spacing)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/dualssl-real-size"))
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--sites", default=SITES)
    p.add_argument("--cases-per-site", type=int, default=10)
    p.add_argument("--consumers", type=int, default=4)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--eval-config", type=Path, default=REPO / "cluster" / "full-size.yaml")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--data", type=Path, default=None,
                   help="an existing phantom root instead of writing one (e.g. one written at scale 1.0 before)")
    p.add_argument("--no-arms", action="store_true", help="only fingerprint, plan, evaluation time and NIH")
    shared = Path(os.environ.get("DUALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))  # as tests/conftest.py
    p.add_argument("--nih", type=Path, default=shared / "real" / "nih_pancreas_ct_0001",
                   help="the NIH scan's folder (ct.nii.gz, pancreas.nii.gz; default: DUALSSL_SHARED_DATA or ../shared/data)")
    args = p.parse_args(argv)

    from studies.local_cluster import reserve_auth, study_cluster

    reserve_auth()
    from dualssl.config import Config
    from dualssl.data.datalist import load_datalist
    from dualssl.data.fingerprint import fingerprint_cases, site_differences, summarise_sites
    from dualssl.data.fingerprint_io import site_table, write_fingerprint
    from dualssl.data.phantom import generate_dataset
    from dualssl.data.plan import plan_from_fingerprint

    sites = [s for s in args.sites.split(",") if s]
    root = args.data or args.out / f"phantom-{args.scale:g}-{len(sites)}x{args.cases_per_site}"
    results: dict = {"scale": args.scale, "sites": sites, "cases_per_site": args.cases_per_site,
                     "consumers": args.consumers, "cpus": os.cpu_count()}
    t = time.time()
    if args.data is None and not (root / "dataset.json").is_file():
        generate_dataset(root, sites=sites, cases_per_site=args.cases_per_site, seed=0, scale=args.scale,
                         workers=args.gen_workers)
        results["generate_s"] = round(time.time() - t, 1)
    cases = load_datalist(root)

    t = time.time()
    rows = fingerprint_cases(cases, workers=2)
    results["fingerprint_s"] = round(time.time() - t, 1)
    summary = summarise_sites(rows)
    differences = site_differences(summary, sites[0])
    print(site_table(summary, differences, sites[0]), flush=True)
    write_fingerprint(args.out / "fingerprint", rows, summary, differences, sites[0])
    cfg = Config.load(args.eval_config).validate()
    cfg.data.source_sites = [sites[0]]
    plan = plan_from_fingerprint(rows, cfg)
    print("[bench] --plan auto " + "\n  ".join(plan.reasons), flush=True)
    results["plan"] = plan.to_json()

    cfg = Config.load(args.eval_config).validate()  # the full-size config's preprocessing (1.5 x 1.5 x 2 mm)
    cfg.data.root, cfg.data.source_sites = str(root), [sites[0]]
    cfg.data.cache_dir = str(args.out / "cache")
    cfg.data.num_workers = 0
    if not args.no_arms:
        with study_cluster(None) as address:
            from studies.tune import connect

            connect(address, log_to_driver=False)
            results["lazy"] = arm("lazy", cfg, args.consumers, one_pass=False)
            results["one_pass"] = arm("one pass", cfg, args.consumers, one_pass=True)
            import ray

            ray.shutdown()

    if not args.skip_eval:
        test_case = next(c for c in cases if c.site != sites[0])
        results["eval"] = eval_time(args.eval_config, test_case, f"phantom scale {args.scale:g}, CPU, untrained net")
        print(f"[bench] evaluation of one test case: {results['eval']}", flush=True)
    results["nih"] = nih(args.nih, args.out / "nih-cache")
    print(f"[bench] NIH: {results['nih']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_arms:
        print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [f"phantom scale {r['scale']:g}, {len(r['sites'])} sites x {r['cases_per_site']} cases, "
             f"{r['consumers']} concurrent consumers, {r['cpus']} CPUs (phantom: a test fixture)",
             "| arm | first step of last trial (s) | every case read (s) | pass CPU s | consumers CPU s | "
             "total CPU s | cache files | peak memory (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for key in ("lazy", "one_pass"):
        a = r[key]
        lines.append(f"| {a['arm']} | {a['first_step_last_s']} | {a['all_read_s']} | {a['pass_cpu_s']} | "
                     f"{a['consumer_cpu_s']} | {a['total_cpu_s']} | {a['files']} | {a['peak_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
