"""Pareto front of trials scored on several objectives (e.g. mean unseen Dice up, stability std down)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SENSES = ("max", "min")


def pareto_front(points: Sequence[Sequence[float]], senses: Sequence[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points.

    Args:
        points: ``n x m`` objective values, one row per point (trial).
        senses: ``m`` entries, ``"max"`` or ``"min"``: which way each objective improves.

    A point is dominated when another is at least as good on every objective and strictly better on
    one. Equal points do not dominate each other, so duplicates on the front are all kept. A point
    with a NaN objective is never on the front and dominates nothing.
    """
    senses = [str(s).lower() for s in senses]
    bad = [s for s in senses if s not in SENSES]
    if bad:
        raise ValueError(f"senses: each must be 'max' or 'min', got {bad}")
    if len(points) == 0:
        return []
    try:
        arr = np.asarray(points, dtype=float)
    except ValueError:
        raise ValueError("points: every point needs the same number of numeric objectives") from None
    if arr.ndim != 2 or arr.shape[1] != len(senses):
        raise ValueError(f"points: expected shape (n, {len(senses)}) to match senses={senses}, "
                         f"got {arr.shape}")
    sign = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    cost = arr * sign                                   # every objective now improves downwards
    valid = ~np.isnan(cost).any(axis=1)
    c = cost[valid]
    # dominated[i] = some j with c[j] <= c[i] everywhere and < somewhere; O(n^2 m), fine for trials.
    le = (c[:, None, :] <= c[None, :, :]).all(axis=2)   # le[j, i]: j at least as good as i
    lt = (c[:, None, :] < c[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)
    return [int(i) for i in np.flatnonzero(valid)[~dominated]]
