"""Markdown rendering of a report ``Document`` (figures linked by file name, beside report.md)."""

from __future__ import annotations

from dualssl.report.document import Document, Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(t: Table) -> str:
    """A GitHub-flavoured Markdown table; numeric-looking columns right-aligned."""
    def numeric(col: int) -> bool:
        cells = [r[col] for r in t.rows if r[col] not in ("", "–")]
        return bool(cells) and all(c[:1].isdigit() or c[:1] in "-+<" for c in cells)
    align = ["---:" if numeric(i) else ":---" for i in range(len(t.header))]
    lines = ["| " + " | ".join(_cell(h) for h in t.header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render(doc: Document) -> str:
    """The whole report as Markdown."""
    parts = [f"# {doc.title}", ""]
    if doc.facts:
        parts += [f"- **{label}:** {text}" for label, text in doc.facts] + [""]
    for s in doc.sections:
        parts += [f"## {s.title}", ""]
        if s.text:
            parts += [s.text, ""]
        if s.table is not None:
            parts += [table(s.table), ""]
        if s.links:
            parts += [f"- [{label}]({href})" for label, href in s.links] + [""]
        if s.figure is not None:
            parts += [f"![{s.caption or s.title}]({s.figure.name})", ""]
            if s.caption:
                parts += [f"*{s.caption}*", ""]
    return "\n".join(parts)
