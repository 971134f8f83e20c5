"""Writers of evaluation results: the per-case CSV and ``summary.json``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LEADING_COLUMNS: tuple[str, ...] = ("case_id", "site", "dice", "jaccard", "nsd", "hd95", "asd")


def write_per_case_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One line per case: ``case_id, site, dice, jaccard, nsd, hd95, asd``, then any other keys in first-seen
    order (NaN is written as ``nan``)."""
    columns = list(LEADING_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (strict JSON has no NaN); tuples become lists; paths become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary_json(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Strict JSON (NaN -> null), indented, keys in insertion order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return path
