"""Real-size preprocessing, side by side: today's lazy path vs the study's one pass before the trials.

Writes a phantom (default scale 1.0 = clinical size, 4 sites x 10 cases; the phantom is a test fixture,
not evidence about real hospitals) or takes one (``--data``, only read: the cache, fingerprint and
results go under ``--out``), fingerprints it (``dualssl.data.fingerprint``, processes) and plans it
(``--plan auto``'s rule), then runs two arms on the same data, each from an empty cache, with a
private Ray head up in both (a study has one either way). ``--consumers`` (default 4) trial-like
processes start at once in each arm; each models one trial of a study:

1. builds the data as a trial does (``dualssl.data.loaders.build_data``: the shared on-disk cache,
   filled on first touch), takes its first training batch (its "first training step"), then reads
   every training and validation volume once (the rest of its first epoch's data);
2. evaluates every unseen-site case once, preprocessing only (the network's time is the same in both
   arms and is measured separately below): what the cross-site evaluation's ``Predictor`` reads.

- **lazy** (before the one pass): trials fill the cache with their source cases on first touch and
  every trial preprocesses every unseen-site case again from its file (``inference_transforms``);
- **one pass**: ``studies/preprocess.py``'s pass (one Ray task per case, every case a trial reads or
  evaluates) fills the cache first; the trials then only read it, unseen cases included
  (``dualssl.data.cache.CachedInference``, as ``studies/crosssite.py`` does).

Per arm: wall time from the arm's start to the first training batch of the LAST trial and to every
trial having finished; CPU seconds of the whole process tree (driver, Ray head and workers running the
pass's tasks, trial processes: ``tree_memory.TreeMemory``, from ``/proc``; it includes starting the
trial processes and Ray's workers and their imports, the same in both arms but for the pass's workers),
beside the pass tasks' own CPU (``DataPass.cpu_s``: ``time.process_time`` in each task, every thread of
the worker while it ran; checked equal to ``getrusage``) and the trials' own from after their imports
(``getrusage``: every thread, loader children included); peak memory of the process tree (summed PSS);
cache files written. Then the cross-site evaluation time of one full-size test case
(``Predictor.predict_file`` with the ``--eval-config`` network, untrained: the time does not depend on
the weights), and the NIH scan through the fingerprint and the preprocessing::

    python benchmarks/real_size_preprocess.py --scale 0.3 --cases-per-site 3 --skip-eval   # a quick look
    python benchmarks/real_size_preprocess.py --data PHANTOM --out /tmp/rs-out              # real size (long)
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


def _rusage_cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def consume(cfg, unseen: list, one_pass: bool, t0: float, out: "mp.Queue") -> None:
    """One trial-like process: build the data, first training batch, read every training and
    validation volume once, then preprocess every unseen-site case once (from the cache in the one-pass
    arm, from its file otherwise)."""
    import torch

    torch.set_num_threads(1)
    from dualssl.data.cache import CachedInference
    from dualssl.data.loaders import build_data
    from dualssl.data.transforms import inference_transforms

    cpu0 = _rusage_cpu()
    bundle = build_data(cfg.data)
    next(iter(bundle.train_loader))
    first = time.time() - t0
    volumes = bundle.train_loader.dataset.data  # the cached volumes under the random patch transform
    for i in range(len(volumes)):
        volumes[i]
    for i in range(len(bundle.val_volumes)):
        bundle.val_volumes[i]
    read = time.time() - t0
    preprocess = CachedInference(cfg.data, unseen) if one_pass else inference_transforms(cfg.data)
    for case in unseen:
        preprocess({"image": case.image})["image"]
    out.put({"first_step_s": first, "train_read_s": read, "done_s": time.time() - t0, "cpu_s": _rusage_cpu() - cpu0,
             "from_cache": getattr(preprocess, "hits", 0)})


def run_consumers(cfg, unseen: list, n: int, one_pass: bool, t0: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=consume, args=(cfg, unseen, one_pass, t0, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=5))
        except Exception:  # queue.Empty: a consumer that died never reports
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a consumer failed (exit {dead[0]})") from None
    for p in procs:
        p.join()
    return results


def arm(name: str, cfg, unseen: list, consumers: int, one_pass: bool) -> dict:
    from dualssl.data.cache import cache_dir_for

    folder = cache_dir_for(cfg.data)
    shutil.rmtree(folder, ignore_errors=True)
    result: dict = {"arm": name}
    pass_cpu = 0.0
    with TreeMemory(os.getpid(), every_s=0.5) as mem:
        t0 = time.time()
        if one_pass:
            from studies.preprocess import preprocess_pass

            done = preprocess_pass([cfg], [cfg.data.source_sites])
            pass_cpu = done.cpu_s
            result["pass_tree_cpu_s"] = round(mem.cpu_s, 1)  # the tasks plus Ray's worker start-up and imports
            result["pass_wall_s"] = round(done.wall_s, 1)
            result["pass_cases"] = done.cases
        rows = run_consumers(cfg, unseen, consumers, one_pass, t0)
    result.update(
        first_step_last_s=round(max(r["first_step_s"] for r in rows), 1),
        all_done_s=round(max(r["done_s"] for r in rows), 1),
        eval_read_s=round(max(r["done_s"] - r["train_read_s"] for r in rows), 1),
        pass_task_cpu_s=round(pass_cpu, 1), consumer_cpu_s=round(sum(r["cpu_s"] for r in rows), 1),
        tree_cpu_s=round(mem.cpu_s, 1), unseen_from_cache=sum(r["from_cache"] for r in rows),
        files=len(list(folder.glob("*.pt"))), peak_gib=round(mem.peak_gib, 2))
    print(f"[bench] {name}: {result}", flush=True)
    return result


def eval_time(cfg_path: Path, case, scale_note: str, cases: list, root: Path, cache_dir: Path) -> dict:
    """Seconds to segment one test case from its file (today's ``Predictor``) and, when the one-pass arm
    left it in the cache, from the cache (``CachedInference``, as a study's evaluation now does)."""
    import torch

    from dualssl.config import Config
    from dualssl.data.cache import CachedInference
    from dualssl.evaluation.inference import Predictor
    from dualssl.models import SegmentationNet, build_model

    cfg = Config.load(cfg_path).validate()
    cfg.data.root, cfg.data.cache_dir = str(root), str(cache_dir)
    model = SegmentationNet(build_model(cfg.model)).eval()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = {"case": case.case_id, "site": case.site, "config": str(cfg_path), "note": scale_note}
    t = time.time()
    Predictor(model, cfg).predict_file(case.image)
    out["seconds"] = round(time.time() - t, 1)
    reader = CachedInference(cfg.data, cases)
    if reader.cached_path(case.image) is not None:
        t = time.time()
        Predictor(model, cfg, preprocess=reader).predict_file(case.image)
        out["seconds_from_cache"] = round(time.time() - t, 1)
    return out


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


def shared_data() -> Path:
    """``DUALSSL_SHARED_DATA``, else the nearest ``shared/data`` (with its README) beside the checkout or
    one of its parents: ``../shared/data`` of the main checkout, ``../../shared/data`` of a worktree
    under ``wt/``."""
    if os.environ.get("DUALSSL_SHARED_DATA"):
        return Path(os.environ["DUALSSL_SHARED_DATA"])
    for parent in REPO.parents:
        if (parent / "shared" / "data" / "README.md").is_file():
            return parent / "shared" / "data"
    return REPO.parent / "shared" / "data"


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
    p.add_argument("--nih", type=Path, default=shared_data() / "real" / "nih_pancreas_ct_0001",
                   help="the NIH scan's folder (ct.nii.gz, pancreas.nii.gz; default: under DUALSSL_SHARED_DATA, "
                        "else the first shared/data beside the checkout or one of its parents)")
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
    if args.data is not None:  # the dataset's own sites (the first of --sites that it has is the source)
        present = sorted({c.site for c in cases})
        first = next((site for site in sites if site in present), present[0])
        sites = [first, *(site for site in present if site != first)]
        counts = {site: sum(c.site == site for c in cases) for site in sites}
        results.update(sites=sites, cases_per_site=max(counts.values()), data=str(root))
        try:  # a phantom records its scale in dataset.json; other data: none
            results["scale"] = json.loads((root / "dataset.json").read_text())["phantom"]["scale"]
        except (OSError, ValueError, KeyError, TypeError):
            results["scale"] = None
    unseen = [c for c in cases if c.site != sites[0]]  # what each trial's cross-site evaluation reads

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
            results["lazy"] = arm("lazy", cfg, unseen, args.consumers, one_pass=False)
            results["one_pass"] = arm("one pass", cfg, unseen, args.consumers, one_pass=True)
            import ray

            ray.shutdown()

    if not args.skip_eval:
        test_case = next(c for c in cases if c.site != sites[0])
        results["eval"] = eval_time(args.eval_config, test_case, f"phantom scale {results['scale']}, CPU, untrained net",
                                    cases, root, args.out / "cache")
        print(f"[bench] evaluation of one test case: {results['eval']}", flush=True)
    results["nih"] = nih(args.nih, args.out / "nih-cache")
    print(f"[bench] NIH: {results['nih']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_arms:
        print(table(results))
    return 0


def table(r: dict) -> str:
    size = f"phantom scale {r['scale']:g}" if r.get("scale") is not None else f"data {r.get('data')}"
    lines = [f"{size}, {len(r['sites'])} sites x {r['cases_per_site']} cases (source "
             f"{r['sites'][0]}), {r['consumers']} concurrent trial-like processes, {r['cpus']} CPUs "
             "(phantom: a test fixture, not evidence about real hospitals)",
             "| arm | first step of last trial (s) | all trials done (s) | pass tasks CPU s (tree during the pass) | "
             "trials CPU s | "
             "process tree CPU s | unseen cases from cache | cache files | peak memory (GiB PSS) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in ("lazy", "one_pass"):
        a = r[key]
        pass_cpu = f"{a['pass_task_cpu_s']} ({a['pass_tree_cpu_s']})" if "pass_tree_cpu_s" in a else "–"
        lines.append(f"| {a['arm']} | {a['first_step_last_s']} | {a['all_done_s']} | {pass_cpu} | "
                     f"{a['consumer_cpu_s']} | {a['tree_cpu_s']} | {a['unseen_from_cache']} | {a['files']} | "
                     f"{a['peak_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
