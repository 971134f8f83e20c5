"""The study report: figures and a Markdown + self-contained HTML document from per-case rows.

Pure matplotlib (no pyplot state), no Ray, no MLflow; see ``write_report``.
"""

from dualssl.report.build import write_report

__all__ = ["write_report"]
