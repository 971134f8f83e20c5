"""Statistics on a study's per-case table: bootstrap CIs, paired tests against a reference, Pareto front.

Pure functions on plain rows (dicts), as read by ``read_cases`` from the study's per-case CSV.
"""

from dualssl.stats.bootstrap import Interval, hierarchical_bootstrap
from dualssl.stats.cases import read_cases, unseen_rows
from dualssl.stats.paired import pair_rows, paired_differences, paired_unseen, wilcoxon_p
from dualssl.stats.pareto import pareto_front
from dualssl.stats.summary import describe, summarise, summarise_unseen
from dualssl.stats.tables import format_ci, write_csv

__all__ = [
    "Interval", "describe", "format_ci", "hierarchical_bootstrap", "pair_rows", "paired_differences",
    "paired_unseen", "pareto_front", "read_cases", "summarise", "summarise_unseen", "unseen_rows",
    "wilcoxon_p", "write_csv",
]
