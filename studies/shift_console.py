"""What the domain-shift study prints (without ``--verbose``), in the manner of ``tune.py``.

* a progress table of the cells (cell, arm, seed, source site, status, epoch, val Dice) when the
  first cell runs, at most every :data:`REPORT_EVERY_S` seconds on new epochs, and at the end;
* one line per cell that ends (finished, with its best val Dice and unseen Dice; or failed, with
  the first line of its error and where the rest is);
* Tune's "Trial task failed" tracebacks as one line each (the whole traceback is in the trial's
  ``error.txt``);
* after the grid: the headline table (:func:`headline`) and where the report is.

Ray's configuration and result boxes, its per-worker lines and the tracebacks appear only under
``--verbose``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune import ProgressReporter

REPORT_EVERY_S = 180.0
"""The progress table on new epochs at most this often (and when the first cell runs, and at the end)."""
PREFIX = "[domain-shift]"


def _cell(trial) -> dict[str, Any]:
    over = (trial.config or {}).get("study.overrides", {}) or {}
    sources = over.get("data.source_sites") or ["?"]
    return {"cell": over.get("study.cell", str(trial)), "arm": over.get("study.arm", "?"),
            "seed": over.get("optim.seed", "?"), "source": sources[0]}


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _first_line(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # the last line of a traceback names the exception; keep it short
    return (lines[-1] if lines else "")[:limit]


class CellReporter(ProgressReporter):
    """Tune progress reporter of the study's cells (see the module docstring)."""

    def __init__(self, total: int | None = None, print_fn=print):
        self._total = total
        self._print = print_fn
        self._val: dict[str, float] = {}
        self._ended: set[str] = set()
        self._epochs: tuple = ()
        self._last = 0.0
        self._shown = False

    def should_report(self, trials: Sequence, done: bool = False) -> bool:
        for t in trials:  # remember the last measured val Dice (unvalidated epochs report NaN)
            value = (t.last_result or {}).get("val_dice")
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._val[t.trial_id] = float(value)
        self._announce_ended(trials)
        epochs = tuple((t.last_result or {}).get("epochs_done") for t in trials)
        first = not self._shown and any(t.status == "RUNNING" for t in trials)
        due = self._shown and epochs != self._epochs and time.time() - self._last > REPORT_EVERY_S
        if done or first or due:
            self._shown, self._epochs, self._last = True, epochs, time.time()
            return True
        return False

    def _announce_ended(self, trials: Sequence) -> None:
        for t in trials:
            if t.trial_id in self._ended or t.status not in ("TERMINATED", "ERROR"):
                continue
            self._ended.add(t.trial_id)
            c, r = _cell(t), t.last_result or {}
            n = f"{len(self._ended)} of {self._total or len(trials)}"
            if t.status == "TERMINATED" and r.get("final"):
                self._print(f"{PREFIX} cell {c['cell']} finished ({n} ended): best val Dice "
                            f"{_num(r.get('best_val_dice'))} at epoch {r.get('best_epoch', '-')}, unseen Dice "
                            f"{_num(r.get('mean_unseen_dice'))}", flush=True)
            else:
                where = getattr(t, "error_file", None) or getattr(t, "local_path", "")
                error = ""
                try:
                    error = _first_line(open(where).read()) if where and str(where).endswith(".txt") else ""
                except OSError:
                    pass
                self._print(f"{PREFIX} cell {c['cell']} FAILED ({n} ended): {error or t.status}"
                            f" (details: {where})", flush=True)

    def report(self, trials: Sequence, done: bool, *sys_info: str) -> None:
        header = ("cell", "arm", "seed", "source site", "status", "epoch", "val Dice")
        rows = []
        for t in trials:
            c = _cell(t)
            rows.append((c["cell"], c["arm"], str(c["seed"]), c["source"], t.status,
                         str((t.last_result or {}).get("epochs_done", "-")), _num(self._val.get(t.trial_id))))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = lambda cells: "  ".join(f"{v:<{w}}" for v, w in zip(cells, widths))  # noqa: E731
        counts = {s: sum(t.status == s for t in trials) for s in ("RUNNING", "PENDING", "TERMINATED", "ERROR")}
        self._print(f"{PREFIX} cells: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n), flush=True)
        self._print("\n".join([fmt(header), *(fmt(r) for r in rows)]), flush=True)


class _OneLineErrors(logging.Filter):
    """Tune's "Trial task failed for trial X" with its traceback -> one line naming the exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {_first_line(str(exc))} (--verbose for the traceback)"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_tune_errors(verbose: bool) -> None:
    """Without ``--verbose``, Tune's trial-failure tracebacks become one line each."""
    if verbose:
        return
    log = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, _OneLineErrors) for f in log.filters):
        log.addFilter(_OneLineErrors())


def _get(row: Mapping[str, str], *names: str) -> float:
    for name in names:
        try:
            return float(row[name])
        except (KeyError, TypeError, ValueError):
            continue
    return math.nan


def headline(pooled: Sequence[Mapping[str, str]], paired: Sequence[Mapping[str, str]],
             cases: Sequence[Mapping[str, Any]], reference: str = "plain") -> list[str]:
    """The terminal's headline table, one line per arm: unseen-site Dice [CI], the paired difference to
    ``reference`` [CI] and its p, and the distances with ``n_missed`` beside them (HD95 penalised:
    a miss counts as the case's worst distance; plain HD95: found cases only).

    ``pooled``/``paired``: rows of the report's ``pooled_unseen.csv`` / ``paired_differences.csv``
    (pooled rows: no ``site``); ``cases``: the study's unseen-site per-case rows (``cases.csv``).
    """
    diffs = {r["arm"]: r for r in paired if not r.get("site")}
    out = [f"{'arm':<16} {'cases':>5}  {'Dice [95% CI]':<22} {'Δ vs ' + reference + ' [95% CI]':<26} {'p':>7}  "
           f"{'HD95 pen. mm':>12} {'HD95 mm':>8} {'n_missed':>8}"]
    for r in pooled:
        arm = r["arm"]
        d = diffs.get(arm)
        mine = [c for c in cases if c.get("arm") == arm]
        pen = [_get(c, "hd95_penalised") for c in mine]
        found = [_get(c, "hd95") for c in mine]
        missed = sum(int(_get(c, "missed") == 1) for c in mine)
        mean = lambda v: (sum(x for x in v if math.isfinite(x)) / max(1, sum(math.isfinite(x) for x in v))  # noqa: E731
                          if any(math.isfinite(x) for x in v) else math.nan)
        ci = f"{_num(_get(r, 'mean'))} [{_num(_get(r, 'ci_low'))}, {_num(_get(r, 'ci_high'))}]"
        dtext = (f"{_num(_get(d, 'mean_diff'))} [{_num(_get(d, 'ci_low'))}, {_num(_get(d, 'ci_high'))}]"
                 if d else "-")
        p = _get(d, "p_adjusted", "p_value", "p", "p_wilcoxon") if d else math.nan
        out.append(f"{arm:<16} {r.get('n_cases', '-'):>5}  {ci:<22} {dtext:<26} {_num(p):>7}  "
                   f"{_num(mean(pen), 2):>12} {_num(mean(found), 2):>8} {missed:>8}")
    return out


def _read(report: Mapping[str, Any], key: str, budget: int | None = None) -> list[dict[str, str]]:
    """Rows of one of the report's CSVs (none when absent); with ``budget``, arms renamed ``ARM@B``."""
    import csv

    if key not in report:
        return []
    with open(report[key], newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows if budget is None else [{**r, "arm": f"{r['arm']}@{budget}"} for r in rows]


def _title(phantom: bool) -> str:
    return "\nUnseen sites, pooled over source sites, seeds and cases" + (
        " (phantom numbers: a test fixture, not evidence about real hospitals)" if phantom else "") + ":"


def report_headline(report: Mapping[str, str], cases: Sequence[Mapping[str, Any]], phantom: bool,
                    reference: str = "plain") -> list[str]:
    """:func:`headline` from the report's CSVs (``pooled_csv``, ``paired_csv`` paths) and the study's
    per-case rows (unseen sites, no sweep rows), under a title."""
    unseen = [c for c in cases if c.get("role") == "unseen" and not c.get("axis")]
    return [_title(phantom), *headline(_read(report, "pooled_csv"), _read(report, "paired_csv"), unseen, reference)]


def budget_headline(reports: Mapping[int, Mapping[str, Any]], cases: Sequence[Mapping[str, Any]], phantom: bool,
                    reference: str = "plain") -> list[str]:
    """:func:`headline` of a budgeted study: one line per ``ARM@B`` from each budget's report
    (``{budget: its paths}``), the difference to ``reference`` at the same budget."""
    pooled = [r for b, paths in reports.items() for r in _read(paths, "pooled_csv", b)]
    paired = [r for b, paths in reports.items() for r in _read(paths, "paired_csv", b)]
    unseen = [c for c in cases if c.get("role") == "unseen" and not c.get("axis")]
    return [_title(phantom), *headline(pooled, paired, unseen, f"{reference}@B")]
