"""Formatting and writing of statistics rows (plain dicts) as text and CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def format_number(value: Any, digits: int = 3) -> str:
    """A float with ``digits`` decimals, ``–`` for None/NaN, anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_ci(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]``; ``–`` parts for NaN."""
    return f"{format_number(mean, digits)} [{format_number(low, digits)}, {format_number(high, digits)}]"


def format_p(p: float) -> str:
    """A p-value: three significant digits, ``<0.001`` below that, ``–`` for NaN."""
    if p is None or math.isnan(p):
        return "–"
    return "<0.001" if p < 1e-3 else f"{p:.3g}"


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Statistics rows to CSV: columns in first-seen order, None/NaN as empty cells."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for k, v in row.items()})
    return path
