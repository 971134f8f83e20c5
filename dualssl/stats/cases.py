"""The per-case table of a study: read it from CSV, check it, group it.

One row per (arm, seed, source_site, site, case_id) and, for severity sweeps, (axis, severity).
Rows are plain dicts so every function here also takes rows built in memory (tests, notebooks).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REQUIRED: tuple[str, ...] = ("arm", "seed", "source_site", "site", "case_id", "dice")
METRIC_COLUMNS: tuple[str, ...] = ("dice", "nsd", "jaccard", "hd95", "asd")
"""Parsed as floats; empty, ``nan`` or ``NaN`` cells become ``float('nan')`` (except ``dice``)."""
TEXT_COLUMNS: tuple[str, ...] = ("arm", "source_site", "site", "case_id", "role", "axis")
SWEEP_KEYS: tuple[str, ...] = ("axis", "severity")
_MISSING = {"", "nan", "none", "null", "na"}

Row = dict[str, Any]


def _float(text: str, where: str, column: str) -> float:
    if text.strip().lower() in _MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} holds {text!r}, which is not a number; "
                         f"write a number, or leave it empty for a missing value") from None


def normalise_row(raw: Mapping[str, Any], where: str = "row") -> Row:
    """One row with its types fixed: ``seed`` int, metrics and ``severity`` float, ``axis`` None off sweeps.

    Raises ``ValueError`` naming ``where`` and the column when a required column is missing or empty,
    a number does not parse, or Dice is missing (a missed case has Dice 0, not NaN).
    """
    missing = [c for c in REQUIRED if c not in raw]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; the per-case table needs {list(REQUIRED)}")
    row: Row = dict(raw)
    for col in ("arm", "source_site", "site", "case_id"):
        value = "" if raw[col] is None else str(raw[col]).strip()
        if not value:
            raise ValueError(f"{where}: column {col!r} is empty; every row needs an {col}")
        row[col] = value
    seed = raw["seed"]
    try:
        row["seed"] = int(float(str(seed))) if not isinstance(seed, int) else seed
    except ValueError:
        raise ValueError(f"{where}: column 'seed' holds {seed!r}; write an integer seed") from None
    for col in METRIC_COLUMNS:
        if col in raw:
            value = raw[col]
            row[col] = _float(value, where, col) if isinstance(value, str) else (
                math.nan if value is None else float(value))
    if math.isnan(row["dice"]):
        raise ValueError(f"{where}: 'dice' is empty or NaN for case {row['case_id']!r}; "
                         f"a missed organ has Dice 0, so write 0 rather than leaving it empty")
    axis = raw.get("axis")
    axis = None if axis is None or str(axis).strip().lower() in _MISSING else str(axis).strip()
    sev = raw.get("severity")
    sev = None if sev is None or (isinstance(sev, str) and sev.strip().lower() in _MISSING) else sev
    if (axis is None) != (sev is None):
        raise ValueError(f"{where}: a sweep row needs both 'axis' and 'severity' (got axis={axis!r}, "
                         f"severity={sev!r}); fill both or leave both empty")
    row["axis"] = axis
    row["severity"] = None if sev is None else (_float(sev, where, "severity") if isinstance(sev, str)
                                                 else float(sev))
    role = raw.get("role")
    row["role"] = None if role is None or not str(role).strip() else str(role).strip()
    return row


def read_cases(path: str | Path) -> list[Row]:
    """Read a study's per-case CSV into rows with parsed numbers (see ``normalise_row``).

    Errors name the file, the line number (header = line 1) and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such per-case CSV; point to the study's cases CSV")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} in the header {header}; "
                             f"the per-case table needs {list(REQUIRED)}")
        rows = [normalise_row(raw, f"{path}, line {i}") for i, raw in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path}: the table has a header but no rows")
    return rows


def as_rows(rows: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Normalise in-memory rows (idempotent); errors name the row index."""
    out = [normalise_row(r, f"row {i}") for i, r in enumerate(rows)]
    if not out:
        raise ValueError("the per-case table is empty")
    return out


def is_sweep(row: Mapping[str, Any]) -> bool:
    """True for rows of a severity sweep (``axis`` set)."""
    return row.get("axis") is not None


def unseen_rows(rows: Iterable[Row]) -> list[Row]:
    """Rows scored on an unseen site, outside severity sweeps (the headline).

    Without a ``role`` column, a row is unseen when ``site != source_site``.
    """
    def unseen(r: Row) -> bool:
        role = r.get("role")
        return (role == "unseen") if role is not None else r["site"] != r["source_site"]
    return [r for r in rows if unseen(r) and not is_sweep(r)]


def group_by(rows: Iterable[Row], key: Callable[[Row], Hashable]) -> dict[Hashable, list[Row]]:
    """Rows grouped by ``key(row)``, groups in sorted key order (None sorts first)."""
    groups: dict[Hashable, list[Row]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return {k: groups[k] for k in sorted(groups, key=_sort_key)}


def _sort_key(key: Hashable) -> tuple:
    parts = key if isinstance(key, tuple) else (key,)
    return tuple((p is not None, p if isinstance(p, (int, float)) else str(p)) for p in parts)


def ordered(values: Iterable[Any], first: Sequence[Any] = ()) -> list[Any]:
    """Distinct values, those in ``first`` first (in that order), then the rest sorted."""
    seen = list(dict.fromkeys(values))
    head = [v for v in first if v in seen]
    return head + sorted((v for v in seen if v not in head), key=lambda v: (v is None, str(v)))
