"""Named recipes: the one place for presets that the CLI, the studies, tests and benchmarks share.

A recipe is data: a mapping of dotted config names to values (``--set`` style), applied in order
on top of ``Config()`` defaults. Three kinds live here:

* **scales**: ``smoke`` (a one-minute study), ``demo`` (the CPU demo: a narrow net that learns the
  phantom's pancreas in a few hundred steps) and ``learning`` (the learning test and the small
  cross-site benchmark); the full-size network is ``cluster/full-size.yaml``. Every scale trains
  with the standard augmentation on (``data.augment``, nnU-Net's default:
  :func:`dualssl.data.transforms.standard_augmentation`) and validates on at least 2 source cases
  of the phantom it is run on.
* **arms** of the domain-shift study, all under one protocol (same net, schedule, patches,
  standard augmentation and selection; only the keys the arm names differ, :func:`arm_differences`):
  ``plain``, ``contrastive``, ``restoration``, ``dual`` and the domain-generalisation baselines
  ``bigaug``, ``randconv`` and ``gin`` (plain loss + that augmentation on top of the standard one;
  see ``dualssl/data/augment/``); ``plain-sgd-ds`` and ``dual-sgd-ds`` train with nnU-Net's recipe
  (:data:`NNUNET_TRAINING`).
* user recipes: a YAML file ``{name: {dotted.key: value, ...}}`` read by :func:`load_recipes`.

    >>> cfg = apply_recipe(Config(), "demo", "dual")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from dualssl.config import Config, ConfigError

Recipe = Mapping[str, Any]

TINY: Recipe = {
    "model.widths": (8, 16, 32, 64), "data.patch_size": (32, 32, 16), "data.spacing": (3.0, 3.0, 4.0),
    "data.batch_size": 1, "data.samples_per_volume": 1,
    # windows in batches of 4: on the CPU a batch of one runs conv3d 5-10x slower per window
    # (dualssl.evaluation.inference.pad_single_batch, benchmarks/conv_batch.py)
    "eval.sw_batch_size": 4,
}
"""Narrow net, coarse voxels, small patches: the base of the CPU recipes."""

SCALES: dict[str, Recipe] = {
    # 2 patches a step: on the CPU a batch of two trains faster than a batch of one (conv3d, see TINY)
    # 2 of the smoke phantom's 4 cases a site validate (the std of val_stability needs 2)
    "smoke": {**TINY, "data.samples_per_volume": 2, "optim.steps_per_epoch": 4, "optim.lr": 1e-3, "optim.epochs": 2,
              "data.val_fraction": 0.5},
    "demo": {**TINY, "data.patch_size": (48, 48, 32), "data.samples_per_volume": 2,
             # 300 steps: the fixed costs of a trial (worker start-up, cross-site evaluation) stay
             # a quarter of its time or less (benchmarks/study_throughput.py)
             "optim.lr": 3e-3, "optim.steps_per_epoch": 30, "optim.epochs": 10,
             # whole-volume validation every other epoch; ASHA's rungs fall on these epochs
             "eval.val_every": 2,
             # 2 of the phantom's 5 cases a site validate (0.25 would leave 1: one scan would decide
             # the study, and a net that predicts nothing could tie for best).
             "data.val_fraction": 0.4,
             # The progress bar's per-epoch number: whole volumes (the few validation patches can all
             # miss the pancreas, and whole volumes cost seconds here). ASHA always cuts on
             # eval.selection_metric at validated epochs (studies/tune.py).
             "eval.cheap_metric": "val_dice"},
    # 2 of the test phantom's 5 cases a site validate
    "learning": {**TINY, "data.patch_size": (48, 48, 32), "data.batch_size": 2, "data.samples_per_volume": 2,
                 "data.val_fraction": 0.4, "optim.lr": 3e-3, "optim.epochs": 20, "optim.steps_per_epoch": 10,
                 "eval.val_every": 5},
}

ARMS: dict[str, Recipe] = {
    "plain": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0},
    "contrastive": {"loss.lambda_con": 0.1, "loss.lambda_rec": 0.0},
    "restoration": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.1},
    "dual": {"loss.lambda_con": 0.1, "loss.lambda_rec": 0.1},
    "bigaug": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0, "data.domain_aug": "bigaug"},
    "randconv": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0, "data.domain_aug": "randconv"},
    "gin": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0, "data.domain_aug": "gin"},
}

NNUNET_TRAINING: Recipe = {
    "optim.optimizer": "sgd", "optim.momentum": 0.99, "optim.lr": 1e-2, "optim.weight_decay": 3e-5,
    "model.deep_supervision": True,
}
"""nnU-Net v2's training recipe on our network: SGD with Nesterov momentum 0.99, lr 1e-2 with poly
decay, weight decay 3e-5, deep supervision at 1/2 and 1/4 (its augmentation is already our standard
one). The ``*-sgd-ds`` arms are an arm with it on top."""

ARMS.update({f"{arm}-sgd-ds": {**ARMS[arm], **NNUNET_TRAINING} for arm in ("plain", "dual")})

PEER_ARMS: dict[str, Recipe] = {
    # nnU-Net v2 itself on each cell's split (dualssl/peers/nnunet.py): its default trainer, and
    # nnUNetTrainerDA5 (heavier augmentation, what its maintainers suggest under domain shift)
    "nnunet": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0, "study.peer": "nnunet"},
    "nnunet-da5": {"loss.lambda_con": 0.0, "loss.lambda_rec": 0.0, "study.peer": "nnunet-da5"},
}
"""Arms of the domain-shift study that are other systems (``study.peer``), run on the same cells
and budget (``optim.epochs x optim.steps_per_epoch`` iterations) as ``ARMS``."""

RECIPES: dict[str, Recipe] = {**SCALES, **ARMS}


def arm_differences(base: Config, arms: Mapping[str, Recipe], reference: str = "plain"
                    ) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Each arm's resolved config against the reference arm's, both on top of ``base``.

    Args:
        base: the config every cell starts from (a scale recipe, a config file, ``--set``); not changed.
        arms: ``{name: recipe}`` (e.g. :data:`ARMS` plus user arms); must hold ``reference``.
        reference: the arm the others are compared with.

    Returns:
        ``{arm: {dotted key: (reference value, arm value)}}`` for every arm, in ``arms``' order, holding
        only the keys whose resolved values differ (values as in :meth:`Config.flat`: tuples are lists);
        the reference maps to ``{}``.
    """
    if reference not in arms:
        raise ConfigError(f"arm_differences: reference arm {reference!r} is not among {', '.join(arms)}")

    def resolved(recipe: Recipe) -> dict[str, Any]:
        # study.* keys (a peer arm's study.peer) are the study's, not the Config's: compared as they stand
        config_keys = {k: v for k, v in recipe.items() if not str(k).startswith("study.")}
        flat = Config.from_dict(base.to_dict()).with_overrides(config_keys).flat()
        return {**flat, **{k: v for k, v in recipe.items() if str(k).startswith("study.")}}

    ref = resolved(arms[reference])
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for name, recipe in arms.items():
        flat = resolved(recipe)
        out[name] = {k: (ref.get(k), v) for k, v in flat.items() if v != ref.get(k)}
    return out


def load_recipes(path: str | Path) -> dict[str, dict[str, Any]]:
    """User recipes from YAML ``{name: {dotted.key: value}}``; each key is checked on a fresh Config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
        raise ConfigError(f"{path}: expected a mapping of recipe names to mappings of dotted keys")
    for name, values in tree.items():
        try:
            # study.* keys (a peer arm's study.peer, study.peer_plan) are the study's, not the Config's
            Config().with_overrides({k: v for k, v in values.items() if not str(k).startswith("study.")}).validate()
        except ConfigError as exc:
            raise ConfigError(f"{path}: recipe {name}: {exc}") from exc
    return {str(k): dict(v) for k, v in tree.items()}


def get_recipe(name: str, extra: Mapping[str, Recipe] | None = None) -> Recipe:
    table = {**RECIPES, **(extra or {})}
    if name not in table:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(table)}")
    return table[name]


def apply_recipe(cfg: Config, *names: str, extra: Mapping[str, Recipe] | None = None) -> Config:
    """Apply the named recipes to ``cfg`` in order; returns ``cfg``."""
    for name in names:
        cfg.with_overrides(dict(get_recipe(name, extra)))
    return cfg


def recipe_config(*names: str, extra: Mapping[str, Recipe] | None = None) -> Config:
    """``Config()`` with the named recipes applied."""
    return apply_recipe(Config(), *names, extra=extra)
