"""Self-contained HTML rendering of a report ``Document``: inline CSS, figures as base64 PNG, no scripts."""

from __future__ import annotations

import base64
from html import escape

from dualssl.report.document import Document, Table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1100px;
       margin: 2rem auto; padding: 0 1rem; color: #1a1a1a; line-height: 1.5; }
h1 { font-size: 1.7rem; border-bottom: 2px solid #0072B2; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem;
           background: #f4f7fa; padding: .8rem 1rem; border-radius: 6px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; font-size: .88rem; margin: .6rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #ddd; }
th { background: #eef2f6; text-align: left; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:hover td { background: #fafafa; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
"""


def _numeric(text: str) -> bool:
    return text[:1].isdigit() or text[:1] in "-+<–"


def table(t: Table) -> str:
    """An HTML table; numeric-looking cells right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{escape(c)}</td>' if _numeric(c) else f"<td>{escape(c)}</td>"
                         for c in row) + "</tr>\n" for row in t.rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def render(doc: Document) -> str:
    """The whole report as one HTML page; figures are read from their PNG files and embedded."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(doc.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(doc.title)}</h1>"]
    if doc.facts:
        parts.append('<dl class="facts">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>"
                                                   for k, v in doc.facts) + "</dl>")
    for s in doc.sections:
        parts.append(f"<section><h2>{escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{escape(s.text)}</p>")
        if s.table is not None:
            parts.append(table(s.table))
        if s.links:
            parts.append("<ul>" + "".join(f'<li><a href="{escape(href)}">{escape(label)}</a></li>'
                                          for label, href in s.links) + "</ul>")
        if s.figure is not None:
            data = base64.b64encode(s.figure.read_bytes()).decode("ascii")
            alt = escape(s.caption or s.title)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                         + (f"<figcaption>{escape(s.caption)}</figcaption>" if s.caption else "")
                         + "</figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
