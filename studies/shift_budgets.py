"""The training-budget axis of the domain-shift study (``--budgets``) and its reference arm (``--reference``).

A budget is a number of training iterations (optimizer steps) of a cell. ``--budgets 100,300,1000``
turns every arm into one arm per budget, named ``ARM@B`` (``dualssl.report.budgets.budget_arm``),
whose recipe adds ``optim.epochs = B // optim.steps_per_epoch`` and the label ``study.budget: B``
(an MLflow tag ``budget``). nnU-Net cells take their iterations from the same keys
(``dualssl.peers.nnunet.settings_for``: ``optim.epochs x optim.steps_per_epoch``), so every arm of a
budget trains the same number of iterations. A budget must be a positive multiple of the base
config's ``optim.steps_per_epoch`` (epochs are whole). Without ``--budgets`` nothing changes.

Paired statistics pair within a budget (``X@B - REF@B``): ``dualssl.report.budgets``.
"""

from __future__ import annotations

import argparse
from typing import Any

from dualssl.config import Config, ConfigError
from dualssl.recipes import ARMS
from dualssl.report.budgets import BUDGET_SEP, budget_arm
from studies.shift_arms import describe_arms

DEFAULT_REFERENCE = "plain"


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    """``--budgets`` and ``--reference`` on the study's parser."""
    p.add_argument("--budgets", default=None, metavar="B1,B2,...",
                   help="training budgets in iterations (optimizer steps), each a multiple of optim.steps_per_epoch: "
                        "every arm runs at each, as ARM@B (default: one budget, the config's epochs)")
    p.add_argument("--reference", default=None,
                   help="the arm every other arm is compared with (paired differences; with --budgets at the "
                        "same budget); default plain (a study without plain then has no paired comparison)")


def parse_budgets(text: str | None) -> list[int]:
    """``"100,300,1000"`` -> [100, 300, 1000]; None -> [] (no budget axis)."""
    if text is None:
        return []
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise ConfigError(f"--budgets {text}: give a comma list of positive integers (training iterations), "
                          "e.g. --budgets 100,300,1000") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--budgets {text}: every budget must be a positive number of iterations, "
                          "e.g. --budgets 100,300,1000")
    if len(set(values)) != len(values):
        raise ConfigError(f"--budgets {text}: a budget is named twice")
    return values


def budget_epochs(budget: int, steps_per_epoch: int) -> int:
    """Epochs of ``budget`` iterations; refuses a budget that is not whole epochs of ``steps_per_epoch``."""
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--budgets: the base config's optim.steps_per_epoch is {steps_per_epoch} (one pass over the data an "
            "epoch), so an epoch has no fixed number of iterations; set it, e.g. --set optim.steps_per_epoch=10")
    if budget < 1 or budget % steps_per_epoch:
        lower = max(steps_per_epoch, budget // steps_per_epoch * steps_per_epoch)
        raise ConfigError(
            f"--budgets: {budget} is not a positive multiple of optim.steps_per_epoch = {steps_per_epoch} of the "
            f"base config (a budget runs as whole epochs); give a multiple such as {lower} or "
            f"{lower + steps_per_epoch}, or set --set optim.steps_per_epoch=N with N dividing every budget")
    return budget // steps_per_epoch


def reference_arm(args: argparse.Namespace) -> str:
    """``--reference``, else ``plain``."""
    return args.reference or DEFAULT_REFERENCE


def budget_problems(args: argparse.Namespace, cfg: Config | None, arm_names: list[str]) -> list[str]:
    """Every problem of ``--budgets`` / ``--reference`` against the base config and the arms, as text
    (a ``--reference`` given must be an arm of the study; the default ``plain`` need not be)."""
    problems: list[str] = []
    if arm_names and args.reference is not None and args.reference not in arm_names:
        problems.append(f"--reference {args.reference}: not an arm of this study (--arms {args.arms}); name one "
                        f"of {', '.join(arm_names)}, or add it to --arms")
    try:
        budgets = parse_budgets(args.budgets)
    except ConfigError as exc:
        return problems + [str(exc)]
    if not budgets:
        return problems
    if args.epochs is not None:
        problems.append("--epochs and --budgets both set the training length; give one (--budgets sets each "
                        "arm's epochs to budget / optim.steps_per_epoch)")
    clash = [a for a in arm_names if BUDGET_SEP in a]
    if clash:
        problems.append(f"--arms: {', '.join(clash)}: an arm name with '{BUDGET_SEP}' is ambiguous with "
                        f"--budgets (arms are named ARM{BUDGET_SEP}B); rename it in the --arms-file")
    if cfg is not None:
        for budget in budgets:
            try:
                budget_epochs(budget, cfg.optim.steps_per_epoch)
            except ConfigError as exc:
                problems.append(str(exc))
    return problems


def expand_arms(arms: dict[str, dict[str, Any]], sources: dict[str, str], budgets: list[int],
                steps_per_epoch: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each arm x budget as its own arm ``ARM@B`` (budgets outer, arms inner), its recipe plus
    ``optim.epochs`` and ``study.budget``; with no budgets the arms as given."""
    if not budgets:
        return arms, sources
    out: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for budget in budgets:
        epochs = budget_epochs(budget, steps_per_epoch)
        for arm, overrides in arms.items():
            name = budget_arm(arm, budget)
            out[name] = {**overrides, "optim.epochs": epochs, "study.budget": budget}
            origin[name] = f"{sources.get(arm, '?')}; budget {budget} iterations = {epochs} epoch(s) x {steps_per_epoch}"
    return out, origin


def arm_param(arm: str) -> str:
    """The MLflow parameter name of an arm's recipe on the parent run: ``arm.plain``, ``arm.plain_at_300``
    (MLflow refuses ``@`` in a parameter name)."""
    return f"arm.{arm.replace(BUDGET_SEP, '_at_')}"


def describe_budget_arms(cfg: Config, arms: dict[str, dict[str, Any]], sources: dict[str, str],
                         budgets: list[int], reference: str) -> list[dict[str, str]]:
    """``describe_arms`` rows; with budgets, each ``ARM@B`` against ``REF@B`` (the same budget)."""
    if not budgets:
        return describe_arms(cfg, arms, sources, reference)
    rows: list[dict[str, str]] = []
    for budget in budgets:
        suffix = f"{BUDGET_SEP}{budget}"
        mine = {a: v for a, v in arms.items() if a.endswith(suffix)}
        ref = budget_arm(reference, budget)
        absent = ref not in mine  # the default plain need not be an arm: its recipe at this budget
        if absent:
            mine = {ref: {**ARMS.get(reference, {}), "optim.epochs": budget_epochs(budget, cfg.optim.steps_per_epoch),
                          "study.budget": budget}, **mine}
        rows += [r for r in describe_arms(cfg, mine, sources, ref) if not (absent and r["arm"] == ref)]
    return rows
