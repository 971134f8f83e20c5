"""The report as data: a title, a header of study facts and sections of text, table and figure.

``markdown.render`` and ``html.render`` turn the same ``Document`` into each format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """A text table: header cells and rows of already formatted cells."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One part of the report; any of text, table and figure may be absent."""

    title: str
    text: str = ""
    table: Table | None = None
    figure: Path | None = None
    caption: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)
    """(label, href relative to the report's folder), e.g. other reports beside this one."""


@dataclass
class Document:
    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def facts_from_meta(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``meta`` -> (label, text) pairs: lists joined by commas, ``*_s`` / ``wall_time`` seconds as a duration."""
    out = []
    for key, value in meta.items():
        label = key.removesuffix("_s").replace("_", " ")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                key.endswith("_s") or key in ("wall_time", "wall_clock")):
            text = _duration(float(value))
        elif isinstance(value, (list, tuple, set)):
            text = ", ".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            text = ", ".join(f"{k}={v}" for k, v in value.items())
        else:
            text = str(value)
        out.append((label[:1].upper() + label[1:], text))
    return out
