"""The arms of a domain-shift study: their overrides, where each arm's settings came from, and what
each arm changes relative to ``plain`` once resolved on the study's base config.

Sources of an arm's settings:

* ``default recipe`` (``dualssl.recipes.ARMS``);
* ``--arms-file PATH`` (adds or redefines arms);
* ``--from-study DIR (trial ID)``: the best trial's searched ``loss.*`` values of a finished
  ``tune.py`` study, applied to the ``dual`` arm only. The study must have selected its trials on
  source validation (``study.json`` ``selection: source-val``): an oracle-selected study chose its
  weights on unseen-site data, and a domain-shift study that reports "no unseen-site data" cannot
  use them, so it is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dualssl.config import Config, ConfigError
from dualssl.recipes import ARMS, PEER_ARMS, arm_differences, load_recipes

REFERENCE = "plain"
SOURCE_VAL = "source-val"


def arm_table(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(the arms asked for, each a dict of dotted overrides; where each arm's settings came from)."""
    table = {name: dict(values) for name, values in {**ARMS, **PEER_ARMS}.items()}
    origin = {name: "default recipe (dualssl.recipes.ARMS)" for name in ARMS}
    origin.update({name: "peer system (dualssl.recipes.PEER_ARMS)" for name in PEER_ARMS})
    if args.arms_file:
        user = load_recipes(args.arms_file)
        table.update(user)
        origin.update({name: f"--arms-file {args.arms_file}" for name in user})
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in table]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join(table)} "
                          "(add your own with --arms-file)")
    if len(names) < 1 or len(set(names)) != len(names):
        raise ConfigError(f"--arms {args.arms}: name each arm once")
    arms = {a: table[a] for a in names}
    sources = {a: origin[a] for a in names}
    for arm, values in arms.items():  # a peer system (nnU-Net) must be importable on the driver
        if values.get("study.peer"):
            from dualssl.peers import missing

            why = missing(str(values["study.peer"]))
            if why:
                raise ConfigError(f"--arms {arm}: {why}")
    if args.from_study:
        if "dual" not in arms:
            raise ConfigError("--from-study sets the dual arm's loss weights, but --arms has no 'dual'")
        weights, trial_id = best_loss_weights(args.from_study)
        arms["dual"] = {**arms["dual"], **weights}
        sources["dual"] += (f" + --from-study {args.from_study} (trial {trial_id}, selection {SOURCE_VAL}): "
                            + ", ".join(sorted(weights)))
    return arms, sources


def study_selection(study: Path, manifest: dict[str, Any]) -> str:
    """The ``--selection`` a ``tune.py`` study ranked its trials by; refuses anything but source-val."""
    selection = manifest.get("selection")
    if selection == SOURCE_VAL:
        return selection
    if selection == "oracle":
        raise ConfigError(
            f"--from-study {study}: the study was oracle-selected (study.json selection: oracle): its trials were "
            "ranked on unseen-site Dice, so its weights have seen the test sites and this study's numbers would "
            "not be unseen-site results. Rerun tune.py with --selection source-val (the default) and pass that "
            "study's folder, or leave --from-study out")
    raise ConfigError(f"--from-study {study}: study.json records no --selection source-val (found "
                      f"{selection!r}); give the folder of a tune.py study run with --selection source-val")


def best_loss_weights(study: Path) -> tuple[dict[str, Any], str]:
    """(the searched ``loss.*`` values, the trial id) of the best trial of a finished source-val study."""
    trials, manifest_path = study / "trials.json", study / "study.json"
    if not trials.is_file() or not manifest_path.is_file():
        raise ConfigError(f"--from-study {study}: no trials.json / study.json; give the folder of a finished "
                          "tune.py study (its --study-dir, by default ~/dualssl-studies/dualssl-study)")
    manifest = json.loads(manifest_path.read_text())
    study_selection(study, manifest)
    best_id = manifest.get("best_trial_id")
    rows = {r["trial_id"]: r for r in json.loads(trials.read_text())}
    if best_id not in rows:
        raise ConfigError(f"--from-study {study}: study.json names no best trial; did the study finish?")
    weights = {k: v for k, v in rows[best_id].get("params", {}).items() if k.startswith("loss.")}
    if not weights:
        raise ConfigError(f"--from-study {study}: the best trial {best_id} searched no loss.* parameter")
    return weights, str(best_id)


def describe_arms(cfg: Config, arms: dict[str, dict[str, Any]], sources: dict[str, str],
                  reference: str = REFERENCE) -> list[dict[str, str]]:
    """One row per arm for the report and ``study.json``: ``arm``, ``settings_from``, ``differences``
    (text: ``key: plain value -> arm value``, comma-separated)."""
    diffs = arm_differences(cfg, {reference: ARMS.get(reference, {}), **arms}, reference)
    rows = []
    for arm in arms:
        changed = diffs[arm]
        text = ("none (the reference)" if arm == reference else
                ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items())) or "none")
        rows.append({"arm": arm, "settings_from": sources.get(arm, "?"), "differences": text})
    return rows
