"""Shared fixtures: one small phantom dataset per test session, and the real data beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DUALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Small enough for 2 CPU cores, large enough that a narrow net learns the pancreas.
TEST_SITES = ["pv_standard", "native_thick", "cone_beam"]
TEST_SCALE = 0.3
TEST_CASES_PER_SITE = 5


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """An MSD-layout phantom with TEST_SITES x TEST_CASES_PER_SITE cases (generated once)."""
    from dualssl.data.phantom import generate_dataset

    out = tmp_path_factory.mktemp("phantom") / "dataset"
    return Path(generate_dataset(out, sites=TEST_SITES, cases_per_site=TEST_CASES_PER_SITE,
                                 seed=0, scale=TEST_SCALE))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip when it is absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
