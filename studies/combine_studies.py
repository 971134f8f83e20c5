"""One report from several finished domain-shift studies run on the same data and splits.

A study is data (``cases.csv``, ``cells.csv``, ``study.json``, ``fingerprint/fingerprint.json``), so arms
run at different times (e.g. a new recipe after a baseline, or nnU-Net once and our arms later) can be
compared under the same statistics, as if they were one study. The pairing of ``dualssl.stats``
(seed, source site, site, case) is only valid when every study saw the same cases with the same
source-validation split, so this refuses, naming the studies and what differs:

* a study that has not finished (no ``cases.csv``: finish or ``--resume`` it);
* different data: the per-case fingerprints (spacing, shape, orientation, intensities, label volume;
  not the file paths) differ;
* a different split: a (seed, source site) whose source-validation cases differ;
* an arm that two studies both ran (rename it in one study's ``--arms-file``, or leave one study out).

Usage::

    python studies/combine_studies.py STUDY_A STUDY_B --reference nnunet --out COMBINED

writes ``COMBINED/cases.csv``, ``COMBINED/cells.csv`` and ``COMBINED/report/`` (with ``ARM@B`` arms, one
report per budget and the budget axis, as ``studies/domain_shift.py --budgets`` does).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dualssl.config import ConfigError

COMPARED_CASE_KEYS = ("case_id", "site", "spacing", "shape", "orientation", "dtype", "body_percentiles",
                      "label_percentiles", "label_ml")
"""Fingerprint fields that must agree case by case (the image path differs from study to study)."""


def read_study(folder: Path) -> dict[str, Any]:
    """A finished study's files: ``manifest`` (study.json), ``cases`` (rows), ``cells`` (rows as
    text) and ``fingerprint`` (its per-case list without paths)."""
    from dualssl.stats import read_cases

    needed = {name: folder / name for name in ("study.json", "cases.csv", "cells.csv")}
    for name, path in needed.items():
        if not path.is_file():
            raise ConfigError(f"{path}: missing; {folder} is not a finished domain-shift study "
                              f"(finish it, or rerun it with --resume)")
    fp_path = folder / "fingerprint" / "fingerprint.json"
    if not fp_path.is_file():
        raise ConfigError(f"{fp_path}: missing; the study predates fingerprints: its data cannot be checked")
    with needed["cells.csv"].open(newline="") as fh:
        cells = list(csv.DictReader(fh))  # the report's budget section parses its numbers
    fingerprint = sorted(({k: c.get(k) for k in COMPARED_CASE_KEYS}
                          for c in json.loads(fp_path.read_text())["cases"]), key=lambda c: str(c["case_id"]))
    return {"folder": folder, "manifest": json.loads(needed["study.json"].read_text()),
            "cases": read_cases(needed["cases.csv"]), "cells": cells, "fingerprint": fingerprint}


def _split(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any], set[str]]:
    """``{(seed, source_site): {source-validation case ids}}``."""
    out: dict[tuple[Any, Any], set[str]] = {}
    for r in rows:
        if r["role"] == "source":
            out.setdefault((r["seed"], r["source_site"]), set()).add(str(r["case_id"]))
    return out


def check_comparable(studies: Sequence[dict[str, Any]]) -> None:
    """Raise ``ConfigError`` naming the studies and the difference unless they can be pooled."""
    first = studies[0]
    owner: dict[str, Path] = {}
    for study in studies:
        for arm in {r["arm"] for r in study["cases"]}:
            if arm in owner:
                raise ConfigError(f"arm {arm!r} is in both {owner[arm]} and {study['folder']}: rename it in one "
                                  "study's --arms-file, or leave one study out")
            owner[arm] = study["folder"]
    for study in studies[1:]:
        if study["fingerprint"] != first["fingerprint"]:
            ids = {c["case_id"] for c in first["fingerprint"]} ^ {c["case_id"] for c in study["fingerprint"]}
            what = f"cases only in one: {sorted(ids)[:5]}" if ids else "the same case ids with different images"
            raise ConfigError(f"{study['folder']} and {first['folder']} were run on different data ({what}); "
                              "only studies of the same dataset can be combined")
        mine, theirs = _split(study["cases"]), _split(first["cases"])
        for key in sorted(set(mine) & set(theirs), key=str):
            if mine[key] != theirs[key]:
                raise ConfigError(f"{study['folder']} and {first['folder']} validated seed {key[0]}, source "
                                  f"{key[1]} on different cases ({sorted(mine[key] ^ theirs[key])[:5]}): their "
                                  "splits differ (data.split_seed or data.val_fraction), so cases do not pair")


def combine(folders: Sequence[str | Path], out: str | Path, *, reference: str, n_boot: int = 2000) -> dict[str, Any]:
    """Check, pool and report ``folders``; returns the report's paths (``budgets`` per budget when the arms
    are ``ARM@B``)."""
    from dualssl.report import write_report
    from dualssl.report.budgets import split_budget_arm, write_budget_reports
    from dualssl.report.study_sections import budget_section
    from studies.shift_table import CASE_COLUMNS, write_csv

    if len(folders) < 2:
        raise ConfigError("give at least two study folders to combine")
    studies = [read_study(Path(f)) for f in folders]
    check_comparable(studies)
    cases = [r for s in studies for r in s["cases"]]
    cells = [c for s in studies for c in s["cells"]]
    arms = list(dict.fromkeys(r["arm"] for r in cases))
    budgets = sorted({b for b in (split_budget_arm(a)[1] for a in arms) if b is not None})
    known = {split_budget_arm(a)[0] for a in arms}
    if reference not in known:
        raise ConfigError(f"--reference {reference!r} is not an arm of these studies ({', '.join(sorted(known))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(cases, out / "cases.csv", CASE_COLUMNS)
    write_csv(cells, out / "cells.csv")
    arms_info = [{**row, "differences": f"{row['differences']} (vs {s['manifest'].get('reference', '?')}, "
                                          f"in {s['folder'].name})"}
                 for s in studies for row in s["manifest"].get("arms_provenance", [])]
    meta = {"studies": [str(s["folder"]) for s in studies], "arms": arms, "reference": reference,
            "pooled": "same data (per-case fingerprints) and source-validation splits, checked"}
    title = "Domain shift: " + " + ".join(s["manifest"].get("experiment", s["folder"].name) for s in studies)
    failed = [c for c in cells if c.get("status") != "completed"]
    if budgets:
        return write_budget_reports(cases, out / "report", title, meta, budgets, reference=reference, cells=cells,
                                    arms_info=arms_info, failed_cells=failed, n_boot=n_boot)
    section = budget_section(cells)
    return write_report(cases, out / "report", title, meta, reference=reference, arms_info=arms_info,
                        failed_cells=failed, total_cells=len(cells), n_boot=n_boot,
                        extra_sections=[section] if section else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("studies", nargs="+", help="finished domain-shift study folders (--study-dir)")
    p.add_argument("--reference", default="plain", help="the arm every other arm is compared with")
    p.add_argument("--out", required=True, help="folder for the pooled cases.csv, cells.csv and report/")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of the report")
    args = p.parse_args(argv)
    try:
        paths = combine(args.studies, args.out, reference=args.reference, n_boot=args.n_boot)
    except ConfigError as exc:
        print(f"studies/combine_studies.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {paths.get('html')}")
    for budget, p_b in paths.get("budgets", {}).items():
        print(f"  budget {budget}: {p_b['html']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
