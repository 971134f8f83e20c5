"""Statistics on a study's per-case table: crossed patients x seeds CIs and t-tests, paired differences
against a reference (Holm-adjusted, with effect sizes), Pareto front.

Pure functions on plain rows (dicts), as read by ``read_cases`` from the study's per-case CSV.
"""

from dualssl.stats.bootstrap import Interval, hierarchical_bootstrap
from dualssl.stats.cases import read_cases, unseen_rows
from dualssl.stats.crossed import CrossedInterval, crossed_mean, holm
from dualssl.stats.paired import (effect_size, match_pairs, pair_rows, paired_differences, paired_unseen,
                                  wilcoxon_p)
from dualssl.stats.pareto import pareto_front
from dualssl.stats.summary import describe, summarise, summarise_unseen
from dualssl.stats.tables import format_ci, write_csv

__all__ = [
    "CrossedInterval", "Interval", "crossed_mean", "describe", "effect_size", "format_ci", "hierarchical_bootstrap",
    "holm", "match_pairs", "pair_rows", "paired_differences", "paired_unseen", "pareto_front", "read_cases",
    "summarise", "summarise_unseen", "unseen_rows", "wilcoxon_p", "write_csv",
]
