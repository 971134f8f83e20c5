"""Hierarchical percentile bootstrap of a mean: seeds resampled, then cases resampled within each site.

Why not ``scipy.stats.bootstrap``: it resamples one level of independent observations (optionally
paired). A study's per-case numbers are nested: training seeds (the run-to-run variation of the
method) and, within each seed, cases of each (source_site, site) stratum (the sampling of patients).
Treating every (seed, case) row as independent would understate the uncertainty, because rows of one
seed share a trained model and rows of one case share a patient. So this module draws the two levels
itself and takes the plain percentile interval (BCa has no standard hierarchical form).

Draw order (fixed, so a test can re-derive every replicate with the same generator)::

    rng = np.random.default_rng(seed)
    pick = rng.integers(0, S, size=(n_boot, S))           # seeds drawn, with replacement
    for each stratum g, sorted by str(g):
        u = rng.random((n_boot, S, K_g))                 # K_g = most cases any seed has in g
        case index = floor(u * n[pick, g])                # cases drawn within the drawn seed and g
    replicate = sum of drawn values / number of drawn values
    interval = np.percentile(replicates, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])

The statistic is the mean over all drawn rows, which equals the point estimate (the mean over all
rows) when every seed has the same cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_N_BOOT = 10_000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided percentile interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a zero-width interval at 0 does not)."""
        return bool(self.low > 0 or self.high < 0)


def nested_values(values: Mapping[tuple, Sequence[float]]) -> tuple[list, list, dict]:
    """``{(seed, stratum): values}`` -> (seeds, strata, same mapping as float arrays), NaN dropped."""
    arrays = {k: np.asarray(v, dtype=float) for k, v in values.items()}
    arrays = {k: a[~np.isnan(a)] for k, a in arrays.items()}
    seeds = sorted({k[0] for k in arrays})
    strata = sorted({k[1] for k in arrays}, key=str)
    return seeds, strata, arrays


def hierarchical_bootstrap(values: Mapping[tuple, Sequence[float]], *, n_boot: int = DEFAULT_N_BOOT,
                           ci: float = 0.95, seed: int = 0) -> Interval:
    """Mean of all values and its percentile CI, resampling seeds then cases within each stratum.

    Args:
        values: ``{(seed, stratum): per-case values}``; a stratum is any hashable (the study uses
            ``(source_site, site)``). NaN values are dropped.
        n_boot: number of bootstrap replicates.
        ci: coverage of the two-sided interval, in (0, 1).
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same interval.

    Returns ``Interval(mean, low, high)``; all NaN when no value is left.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    seeds, strata, arrays = nested_values(values)
    total_n = sum(a.size for a in arrays.values())
    if total_n == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    estimate = float(np.concatenate(list(arrays.values())).mean())
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    total = np.zeros(n_boot)
    count = np.zeros(n_boot)
    for stratum in strata:
        per_seed = [arrays.get((s, stratum), np.empty(0)) for s in seeds]
        n = np.array([a.size for a in per_seed])
        k_max = int(n.max())
        if k_max == 0:
            continue
        padded = np.zeros((n_seeds, k_max))
        for i, a in enumerate(per_seed):
            padded[i, :a.size] = a
        n_pick = n[pick]                                        # (B, S)
        u = rng.random((n_boot, n_seeds, k_max))
        idx = np.floor(u * n_pick[..., None]).astype(np.int64)  # < n_pick; 0 where n_pick == 0
        drawn = padded[pick[..., None], idx]
        valid = np.arange(k_max) < n_pick[..., None]
        total += np.where(valid, drawn, 0.0).sum(axis=(1, 2))
        count += n_pick.sum(axis=1)
    # A replicate may draw only seeds without values (possible when seeds cover different strata).
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = total / count
    reps = reps[count > 0]
    alpha = (1 - ci) / 2
    low, high = np.percentile(reps, [100 * alpha, 100 * (1 - alpha)])
    return Interval(estimate, float(low), float(high))
