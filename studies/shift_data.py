"""The data of a domain-shift study: the sites of a dataset (and its severity-sweep records), the
``--sweep`` flag, and the procedural phantom made once in the study folder when ``--data`` is absent
(a test fixture, not evidence about real hospitals)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dualssl.config import ConfigError

PHANTOM_SITES = ["pv_standard", "native_thick", "lowdose_sharp", "cone_beam"]
SMOKE_SITES = ["pv_standard", "native_thick", "cone_beam"]
DEFAULT_SWEEP = {"noise": [25.0, 50.0]}
"""The default phantom's severity sweep (noise std in HU on top of pv_standard)."""


def sweep_spec(args: argparse.Namespace) -> dict[str, list[Any]]:
    from dualssl.data.phantom.sweeps import parse_sweep_spec

    if args.sweep is None:
        return {} if args.smoke_test else dict(DEFAULT_SWEEP)
    if args.sweep == ["none"]:
        return {}
    out: dict[str, list[Any]] = {}
    for spec in args.sweep:
        try:
            axis, values = parse_sweep_spec(spec)
        except ValueError as exc:
            raise ConfigError(f"--sweep {spec}: {exc}") from exc
        out[axis] = values
    return out


def dataset_sites(root: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(sites of the dataset, sweep records of dataset.json by site)."""
    from dualssl.data.datalist import load_datalist

    sites = sorted({c.site for c in load_datalist(root)})
    sweeps: dict[str, dict[str, Any]] = {}
    meta = root / "dataset.json" if root.is_dir() else None
    if meta is not None and meta.is_file():
        sweeps = json.loads(meta.read_text()).get("sweeps", {}) or {}
    return sites, sweeps


def ensure_data(args: argparse.Namespace, plan: Any) -> Path:
    """The dataset root: ``--data``, or the phantom (with ``plan.sweeps``) generated once in ``plan.study_dir``."""
    if args.data is not None:
        return args.data.expanduser().resolve()
    from dualssl.data.phantom import generate_dataset
    from dualssl.data.phantom.sweeps import sweep_name

    root = plan.study_dir / "phantom"
    if not (root / "dataset.json").is_file():
        base = SMOKE_SITES if args.smoke_test else PHANTOM_SITES
        sweeps = [sweep_name(axis, v) for axis, values in plan.sweeps.items() for v in values]
        print(f"[domain-shift] generating the phantom ({len(base)} sites + {len(sweeps)} sweep sites) in {root}",
              flush=True)
        generate_dataset(root, sites=[*base, *sweeps], cases_per_site=4 if args.smoke_test else 5, seed=0,
                         scale=0.3, workers=max(1, min(4, os.cpu_count() or 1)), progress=True)
    return root
