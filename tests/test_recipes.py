"""A fair protocol: every arm of every shipped recipe trains with the same standard augmentation,
arms differ only in the keys they name (resolved as the domain-shift driver resolves a cell), and
every shipped recipe validates on at least 2 source cases of the data it is run on."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualssl.config import Config, ConfigError  # noqa: E402
from dualssl.data.datalist import Case, split_cases  # noqa: E402
from dualssl.recipes import ARMS, SCALES, arm_differences, recipe_config  # noqa: E402
from studies import domain_shift  # noqa: E402
from studies.preflight import phantom_cases_per_site  # noqa: E402
from studies.trainable import TrialSettings, split_config, study_config  # noqa: E402
from studies.tune import build_parser  # noqa: E402

FULL_SIZE = REPO / "cluster" / "full-size.yaml"
BASES = [*SCALES, "full-size"]


def base_of(name: str) -> Config:
    return Config.load(FULL_SIZE) if name == "full-size" else recipe_config(name)


def cell_config(base: Config, arm: str) -> Config:
    """An arm's cell config as the domain-shift driver builds it: the base's flat keys (Tune's
    param_space), then the cell's ``study.overrides`` (``make_cells``) on top (``split_config``)."""
    cell = domain_shift.make_cells({arm: dict(ARMS[arm])}, [0], ["pv_standard"])[0]
    space = study_config(base, TrialSettings(), {})
    space["study.overrides"] = cell
    cfg, _ = split_config(space)
    return cfg


@pytest.mark.parametrize("base_name", BASES)
def test_every_pair_of_arms_differs_only_in_the_keys_the_arms_name(base_name):
    base = base_of(base_name)
    resolved = {arm: cell_config(base, arm).flat() for arm in ARMS}
    for a, b in itertools.combinations(ARMS, 2):
        differ = {k for k in resolved[a] if resolved[a][k] != resolved[b][k]}
        named = set(ARMS[a]) | set(ARMS[b])
        assert differ <= named, f"{base_name}: {a} vs {b} also differ in {sorted(differ - named)}"
        assert differ, f"{base_name}: {a} and {b} resolve to the same config"
    # the pure function the report calls gives the same differences as the driver's resolution
    diffs = arm_differences(base, ARMS)
    for arm in ARMS:
        expected = {k: (resolved["plain"][k], v) for k, v in resolved[arm].items() if v != resolved["plain"][k]}
        assert diffs[arm] == expected, arm
    assert diffs["plain"] == {} and diffs["dual"] == {"loss.lambda_con": (0.0, 0.1), "loss.lambda_rec": (0.0, 0.1)}
    assert diffs["gin"] == {"data.domain_aug": ("none", "gin")}


@pytest.mark.parametrize("base_name", BASES)
def test_standard_augmentation_is_on_for_every_arm_of_every_shipped_recipe(base_name):
    base = base_of(base_name)
    for arm in ARMS:
        assert cell_config(base, arm).data.augment is True, f"{base_name} + {arm} trains without augmentation"


def test_arm_differences_sees_a_key_a_user_arm_changes_and_names_a_missing_reference():
    arms = {"plain": ARMS["plain"], "mine": {**ARMS["plain"], "data.augment": False, "loss.tau": 0.2}}
    base = recipe_config("smoke")
    before = base.flat()
    diffs = arm_differences(base, arms)
    assert diffs == {"plain": {}, "mine": {"data.augment": (True, False), "loss.tau": (0.05, 0.2)}}
    assert base.flat() == before  # the base is not changed
    with pytest.raises(ConfigError, match="reference arm 'plain'"):
        arm_differences(base, {"dual": ARMS["dual"]})


def _source_cases(n: int) -> list[Case]:
    return [Case(f"c{i}", f"/x/{i}.nii.gz", f"/y/{i}.nii.gz", "pv_standard") for i in range(n)]


@pytest.mark.parametrize("base_name", BASES)
def test_every_shipped_recipe_validates_on_at_least_two_source_cases(base_name):
    """On the data each recipe is run on: the studies' own phantom (smoke, demo), the test phantom
    (learning, tests/conftest.py) and, for the full-size network, a source site of 8 cases or more."""
    from conftest import TEST_CASES_PER_SITE

    n = {"smoke": phantom_cases_per_site(build_parser().parse_args(["--smoke-test"])),
         "demo": phantom_cases_per_site(build_parser().parse_args([])),
         "learning": TEST_CASES_PER_SITE, "full-size": 8}[base_name]
    cfg = base_of(base_name)
    split = split_cases(_source_cases(n), ["pv_standard"], cfg.data.val_fraction, cfg.data.split_seed)
    assert len(split.val) >= 2 and len(split.train) >= 2, (base_name, n, len(split.val), len(split.train))
