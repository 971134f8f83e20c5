"""The study driver's data pass, before any trial starts: fingerprint, ``--plan auto``, one-pass preprocessing.

1. :func:`fingerprint_remote`: every case read once by a Ray task (``dualssl.data.fingerprint``), then
   the per-site table, ``STUDY/fingerprint/fingerprint.{json,csv,png}`` and what differs from the source.
2. ``--plan auto``: :func:`dualssl.data.plan.plan_from_fingerprint` on the source site's cases sets
   ``data.spacing``, ``data.hu_window`` and ``data.patch_size`` of the config every trial starts from.
3. :func:`preprocess_pass`: every case a trial reads or evaluates (source training and validation
   cases of every cell, and every case of the sites the cells are evaluated on: unseen sites,
   severity-sweep sites) goes into the shared cache (``dualssl.data.cache``) by one Ray task per case, spread over
   the cluster's CPUs, each task reserving ``num_cpus=1`` and an estimate of its peak memory
   (:func:`task_memory_bytes`), so Ray never packs more scans onto a node than fit. A case whose
   cache file exists is skipped (a second study with the same preprocessing, or a resumed one, writes
   nothing); an edited scan has a new cache key and is preprocessed again. The first failure cancels
   the rest and raises :class:`studies.preflight.StudyError` naming the file: no trial starts.

Trials then find every file in the cache and only read it (``SharedPersistentDataset``), and the
cross-site evaluation (``studies/crosssite.py``) takes each case's preprocessed image from the same
file (``dualssl.data.cache.CachedInference``: the cached image and its affine are what
``inference_transforms`` would compute), so no cell resamples a test scan again; the prediction still
goes back onto the scan's own grid and is scored against the original label there.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dualssl.config import Config
from dualssl.data.datalist import Case, DatasetError, load_dataset, split_cases

MIN_TASK_MEMORY = 256 * 2**20
BYTES_PER_INPUT_VOXEL = 24
"""Peak bytes per voxel of the input scan in one preprocessing task: the scan as stored (2-4 bytes),
float32 copies through reorientation, resampling and windowing (about 4 x 4), the label (1-4)."""


@dataclass
class DataPass:
    """What the driver's data pass did (logged to MLflow and ``study.json``)."""

    cache_dirs: list[str] = field(default_factory=list)
    cases: int = 0
    written: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    """CPU seconds of the preprocessing tasks themselves (``time.process_time`` in each: every thread of its
    worker while it ran), not Ray's worker start-up and imports."""
    plan: dict[str, Any] | None = None
    """``--plan auto``'s plan of the first source-site set (the base config's)."""
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every source-site set's plan (``{"a,b": plan}``): each cell trains with its own source's plan."""

    def cell_overrides(self, sources: Sequence[str]) -> dict[str, Any]:
        """The planned config keys of a cell training on ``sources`` ({} without --plan auto)."""
        p = self.plans.get(",".join(sources))
        return {} if p is None else {"data.spacing": p["spacing"], "data.hu_window": p["hu_window"],
                                     "data.patch_size": p["patch_size"]}
    fingerprint_dir: str | None = None
    differences: dict[str, list[str]] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        return {"preprocess.cases": self.cases, "preprocess.written": self.written,
                "preprocess.wall_s": round(self.wall_s, 1), "preprocess.cpu_s": round(self.cpu_s, 1)}


def task_memory_bytes(case: Case) -> int:
    """Memory a preprocessing task reserves for ``case``: header voxels x :data:`BYTES_PER_INPUT_VOXEL`."""
    import nibabel as nib

    try:
        voxels = 1
        for n in nib.load(case.image).shape[:3]:
            voxels *= int(n)
    except Exception:  # unreadable header: the task itself reports the file
        return MIN_TASK_MEMORY
    return max(MIN_TASK_MEMORY, voxels * BYTES_PER_INPUT_VOXEL)


def _progress(total: int, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"[study] {what}", unit="case", file=sys.stderr, mininterval=2.0)


def _run_tasks(fn, cases: Sequence[Case], args: tuple, what: str) -> list[Any]:
    """``fn(case, *args)`` as one Ray task per case; results in ``cases`` order. The first failure
    cancels the rest and raises :class:`StudyError` with the task's message (it names the file)."""
    import ray

    from studies.preflight import StudyError

    remote = ray.remote(fn)
    # never more than most of the largest node's memory resource: a bigger request would wait forever
    largest = max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    cap = int(0.9 * largest) if largest > 0 else None
    refs = [remote.options(num_cpus=1, memory=min(task_memory_bytes(c), cap or 2**62), max_retries=0).remote(c, *args)
            for c in cases]
    index = {r: i for i, r in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with _progress(len(refs), what) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[index[done[0]]] = ray.get(done[0])
            except Exception as exc:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(exc, "cause", None) or exc
                message = str(cause) if isinstance(cause, DatasetError) else f"{cases[index[done[0]]].image}: {cause}"
                raise StudyError([f"{what}: {message}"]) from None
            bar.update(1)
    return results


def _fingerprint_task(case: Case):
    from dualssl.data.fingerprint import case_fingerprint

    return case_fingerprint(case)


def _preprocess_task(case: Case, cfg: Config, folder: str, label_values):
    from dualssl.data.cache import ensure_cached

    start = time.process_time()
    wrote = ensure_cached(case, cfg.data, folder, label_values)
    return wrote, time.process_time() - start


def fingerprint_remote(cases: Sequence[Case], out_dir: Path, source: str | None):
    """Step 1: (rows, per-site summary, differences from ``source``, written paths); prints the table."""
    from dualssl.data.fingerprint import site_differences, summarise_sites
    from dualssl.data.fingerprint_io import site_table, write_fingerprint

    rows = _run_tasks(_fingerprint_task, cases, (), "fingerprint")
    summary = summarise_sites(rows)
    differences = site_differences(summary, source) if source in summary else {}
    print(site_table(summary, differences, source), flush=True)
    paths = write_fingerprint(out_dir, rows, summary, differences, source)
    return rows, summary, differences, paths


def trial_cases(cfg: Config, source_sets: Sequence[Sequence[str]]) -> tuple[list[Case], Any]:
    """Every case a trial reads or evaluates, once each, and the dataset's declared label values.

    For each source-site set: its training and validation cases, then every case of the other sites
    (the cross-site evaluation's report and selection parts, ``studies.crosssite.evaluation_parts``).
    Test cases are cached with their label like training cases (the same file serves a cell that
    trains on that site); the evaluation reads only the image from it."""
    info = load_dataset(cfg.data.root)
    seen: dict[str, Case] = {}
    for sources in source_sets:
        split = split_cases(info.cases, list(sources), cfg.data.val_fraction, cfg.data.split_seed)
        for case in [*split.train, *split.val, *(c for site in sorted(split.test) for c in split.test[site])]:
            seen.setdefault(case.image, case)
    return list(seen.values()), info.label_values


def preprocess_pass(cfgs: Sequence[Config], source_sets: Sequence[Sequence[str]]) -> DataPass:
    """Step 3 for each distinct preprocessing among ``cfgs`` (the base config, or one per cell)."""
    from dualssl.data.cache import cache_dir_for

    result = DataPass()
    started = time.time()
    folders: dict[str, Config] = {}
    for cfg in cfgs:
        folders.setdefault(str(cache_dir_for(cfg.data)), cfg)
    for folder, cfg in folders.items():
        cases, labels = trial_cases(cfg, source_sets)
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = _run_tasks(_preprocess_task, cases, (cfg, folder, labels), f"preprocessing into {folder}")
        result.cache_dirs.append(folder)
        result.cases += len(cases)
        result.written += sum(1 for wrote, _ in out if wrote)
        result.cpu_s += sum(cpu for _, cpu in out)
    result.wall_s = time.time() - started
    print(f"[study] preprocessing: {result.written} of {result.cases} case(s) written "
          f"({result.cases - result.written} already cached) in {result.wall_s:.1f} s, {result.cpu_s:.1f} CPU s; "
          f"trials read {', '.join(result.cache_dirs)}", flush=True)
    return result


def prepare_data(cfg: Config, study_dir: Path, *, plan: str = "none", memory_gb: float | None = None,
                 cell_configs: Sequence[Config] | None = None,
                 source_sets: Sequence[Sequence[str]] | None = None) -> DataPass:
    """Steps 1-3 on the driver (connected to Ray), before any trial: fingerprint every case,
    ``--plan auto`` (modifies ``cfg`` and, with the same values, every cell config), preprocess."""
    from dualssl.data.datalist import load_datalist
    from dualssl.data.plan import DEFAULT_MEMORY_GB, plans_per_source

    source_sets = [list(s) for s in (source_sets or [cfg.data.source_sites])]
    cases = load_datalist(cfg.data.root)
    fp_dir = study_dir / "fingerprint"
    rows, _, differences, _ = fingerprint_remote(cases, fp_dir, source_sets[0][0])
    result = DataPass(fingerprint_dir=str(fp_dir), differences=differences)
    cells = [copy.deepcopy(c) for c in (cell_configs or [cfg])]
    if plan == "auto":
        try:
            chosen = plans_per_source(rows, cfg, source_sets, memory_gb=memory_gb or DEFAULT_MEMORY_GB)
        except DatasetError as exc:
            from studies.preflight import StudyError

            raise StudyError([str(exc)]) from None
        for one in chosen.values():
            print("[study] --plan auto " + "\n[study]   ".join(one.reasons), flush=True)
        first = next(iter(chosen.values()))
        first.apply(cfg)
        for c in cells:  # each cell trains on its own source site(s): their plan
            chosen.get(",".join(c.data.source_sites), first).apply(c)
        result.plan = first.to_json()
        result.plans = {key: one.to_json() for key, one in chosen.items()}
        import json

        (fp_dir / "plan.json").write_text(json.dumps(result.plan if len(chosen) == 1 else result.plans, indent=1))
    for c in cells:
        c.data.root = cfg.data.root
    done = preprocess_pass(cells, source_sets)
    done.plan, done.plans = result.plan, result.plans
    done.fingerprint_dir, done.differences = result.fingerprint_dir, differences
    return done


def cell_configs(cfg: Config, cells: Sequence[dict[str, Any]]) -> list[Config]:
    """The config of each grid cell (its ``study.overrides`` on ``cfg``, labels left out), for
    preprocessing every distinct cache a cell will read."""
    out = []
    for cell in cells:
        overrides = {k: v for k, v in cell.items() if not k.startswith("study.")}
        out.append(copy.deepcopy(cfg).with_overrides(overrides))
    return out


def log_to_parent(tracking_uri: str, parent: str, data: DataPass) -> None:
    """The fingerprint folder (table, figure, plan) as artifacts and the plan and pass as params."""
    import mlflow

    from dualssl.data.plan import DataPlan

    client = mlflow.MlflowClient(tracking_uri)
    if data.fingerprint_dir:
        client.log_artifacts(parent, data.fingerprint_dir, artifact_path="fingerprint")
    params = dict(data.params())
    if data.plan:
        p = data.plan
        params.update(DataPlan(p["source_sites"], tuple(p["spacing"]), tuple(p["hu_window"]), tuple(p["patch_size"]),
                               p["memory_gb"], p["estimated_gb"]).params())
    existing = client.get_run(parent).data.params
    for key, value in params.items():
        if key not in existing:  # a resumed study keeps its first values (MLflow params are immutable)
            client.log_param(parent, key, value)


def main(argv: list[str] | None = None) -> int:
    """``python studies/preprocess.py FLAGS``: the data pass alone, with the very flags of
    ``studies/tune.py`` (the RayJob runs it as the step before the study, whose own pass then finds
    every case cached). Exit 2 on a bad flag or scan, naming it."""
    from studies.local_cluster import needs_private_head, reserve_auth, study_cluster
    from studies.preflight import StudyError, build_parser, console_defaults, prepare

    parser = build_parser()
    parser.prog, parser.description = "studies/preprocess.py", "The data pass of a study alone (flags of tune.py)."
    args = parser.parse_args(argv)
    if needs_private_head(args.address):
        reserve_auth()
    console_defaults(args.verbose)
    try:
        plan = prepare(args)
        if args.data is None:
            raise StudyError(["--data: the data pass needs a dataset (tune.py makes its phantom itself)"])
        plan.cfg.data.root = str(args.data.expanduser().resolve())
        plan.study_dir.mkdir(parents=True, exist_ok=True)
        with study_cluster(args.address) as address:
            from studies.tune import connect

            connect(address, log_to_driver=args.verbose)
            prepare_data(plan.cfg, plan.study_dir, plan=args.plan, memory_gb=args.plan_memory_gb)
    except StudyError as exc:
        print(f"studies/preprocess.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return 0


def fingerprint_sections(data_pass: Any, out_dir: Path) -> list:
    """The report's "Dataset fingerprint" section (``dualssl.report.document.Section``): the per-site table,
    what differs from the source site, the per-site figure (copied into ``out_dir``, the report's folder)
    and what ``--plan auto`` chose; [] when the pass wrote no fingerprint. Phantom numbers describe a
    test fixture, not real hospitals."""
    import json
    import shutil

    from dualssl.data.fingerprint_io import FIGURE_NAME, JSON_NAME, SITE_COLUMNS, site_cells
    from dualssl.report.document import Section, Table

    folder = Path(data_pass.fingerprint_dir or "")
    if not (folder / JSON_NAME).is_file():
        return []
    fp = json.loads((folder / JSON_NAME).read_text())
    source = fp.get("source_site")
    text = (f"Every case read once before any cell started (studies/preprocess.py); medians over each site's "
            f"cases, intensities in HU inside the body (> {fp.get('body_hu')}) and inside the label. Source site: "
            f"{source}. Files: fingerprint/fingerprint.json, fingerprint.csv in the study folder.")
    for plan in (data_pass.plans or ({"": data_pass.plan} if data_pass.plan else {})).values():
        text += " Planned with --plan auto: " + " ".join(plan.get("reasons", []))
    figure = None
    if (folder / FIGURE_NAME).is_file():
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        figure = Path(shutil.copy(folder / FIGURE_NAME, Path(out_dir) / FIGURE_NAME))
    table = Table(list(SITE_COLUMNS), site_cells(fp["sites"], fp.get("differences") or {}, source))
    return [Section("Dataset fingerprint", text, table, figure,
                    "Per site, one point per case (source site in red): slice thickness, in-plane spacing, "
                    "label intensity (median, bar p5-p95) and label volume.")]


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
