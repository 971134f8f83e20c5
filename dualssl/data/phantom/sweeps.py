"""Severity sweeps: site profiles derived from a base site with one acquisition knob set to a value.

A sweep profile fixes one shift axis of a base profile (default ``pv_standard``) to one value and
keeps everything else. Every sweep site renders the same NEW patients, never the base site's own
(which a study may train on): case ``i`` of any sweep site of base ``B`` is drawn from ``B``'s case
seeds at index ``i + SWEEP_PATIENTS`` (``dualssl.data.phantom.generate``), so ``sweep-noise-40_003``
and ``sweep-noise-20_003`` are one patient, and not patient ``pv_standard_003``. The rest of the
acquisition draws (pixel size, calibration, noise realisation) are the same random numbers at every
severity too, so along a sweep a curve measures the knob and nothing else.

Severity 0 of a curve is the base site itself: :func:`severity_zero_rows` repeats the base site's
own per-case rows (of each cell) as the sweep's point at the base's own value of the axis
(:func:`base_level`). Those are other patients than the sweep sites', and when the base is the
source site they are its validation cases, on which the best epoch was chosen.

Axes (:data:`AXES`; docs/PHANTOM.md tabulates them):

==============  ======  ================================================================  ============
axis            unit    sets (SiteProfile field)                                          valid values
==============  ======  ================================================================  ============
``noise``       HU      noise std for an average-sized patient (``noise_hu``)             0 to 300
``hu_offset``   HU      calibration offset: stored = scale * HU + offset (``hu_offset``)   -500 to 500
``hu_scale``    x       calibration gain (``hu_scale``)                                   0.5 to 2
``slice``       mm      slice thickness = spacing at scale 1 (``slice_mm``)               0.5 to 10
``phase``       name    contrast phase: native, pancreatic or portal (``phase``)          a phase
``cupping``     HU      cone-beam cupping: drop at the centre of the FOV (``cupping_hu``) 0 to 400
``truncation``  mm      diameter of the truncated circular FOV (``fov_circle_mm``)         100 to 600
``pixel``       mm      in-plane pixel size at scale 1 (``pixel_mm``)                     0.3 to 2.5
==============  ======  ================================================================  ============

Names: ``sweep-AXIS-VALUE`` for the default base (``sweep-noise-20``, ``sweep-hu_offset--50``,
``sweep-phase-native``), ``BASE-sweep-AXIS-VALUE`` for another base.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from dualssl.data.phantom.sites import SITE_PROFILES, SiteProfile
from dualssl.data.phantom.tissues import PHASES

DEFAULT_BASE = "pv_standard"
_NAME = re.compile(r"^(?:(?P<base>[A-Za-z0-9_]+)-)?sweep-(?P<axis>[a-z_]+)-(?P<value>.+)$")


@dataclass(frozen=True)
class SweepAxis:
    """One severity knob: its unit, the valid values and the profile fields it sets."""

    name: str
    unit: str
    meaning: str
    low: float
    high: float
    fields: Callable[[Any], dict[str, Any]]
    """value -> the SiteProfile fields to replace."""

    @property
    def categorical(self) -> bool:
        return self.unit == "name"

    def describe(self) -> str:
        if self.categorical:
            return f"{self.name} ({self.meaning}: {', '.join(PHASES)})"
        return f"{self.name} ({self.unit}, {self.meaning}, {self.low:g} to {self.high:g})"


AXES: dict[str, SweepAxis] = {a.name: a for a in [
    SweepAxis("noise", "HU", "noise std", 0.0, 300.0, lambda v: {"noise_hu": (v, v)}),
    SweepAxis("hu_offset", "HU", "calibration offset", -500.0, 500.0, lambda v: {"hu_offset": (v, v)}),
    SweepAxis("hu_scale", "x", "calibration gain", 0.5, 2.0, lambda v: {"hu_scale": (v, v)}),
    SweepAxis("slice", "mm", "slice thickness", 0.5, 10.0, lambda v: {"slice_mm": (v,)}),
    SweepAxis("phase", "name", "contrast phase", 0.0, 0.0, lambda v: {"phase": v}),
    SweepAxis("cupping", "HU", "cone-beam cupping at the FOV centre", 0.0, 400.0,
              lambda v: {"cupping_hu": (v, v)}),
    SweepAxis("truncation", "mm", "truncated FOV circle diameter", 100.0, 600.0,
              lambda v: {"fov_circle_mm": (v, v)}),
    SweepAxis("pixel", "mm", "in-plane pixel size", 0.3, 2.5, lambda v: {"pixel_mm": (v, v)}),
]}
"""The sweepable shift axes, by name."""


def _axes_help() -> str:
    return "axes (units, valid values): " + "; ".join(a.describe() for a in AXES.values())


def _axis(name: str) -> SweepAxis:
    if name not in AXES:
        raise ValueError(f"unknown sweep axis {name!r}; {_axes_help()}")
    return AXES[name]


def check_value(axis: str, value: Any) -> float | str:
    """``value`` validated for ``axis`` (a float, or a phase name); a ValueError naming the axis,
    its unit and its valid values otherwise."""
    ax = _axis(axis)
    if ax.categorical:
        if value not in PHASES:
            raise ValueError(f"sweep {axis}={value!r}: choose a phase among {', '.join(PHASES)}")
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"sweep {axis}={value!r}: not a number; {ax.describe()}") from None
    if not ax.low <= v <= ax.high:
        raise ValueError(f"sweep {axis}={v:g}: outside {ax.low:g} to {ax.high:g} {ax.unit}; {ax.describe()}")
    return v


def sweep_name(axis: str, value: float | str, base: str = DEFAULT_BASE) -> str:
    """Site name of one sweep value: ``sweep-noise-20``, or ``BASE-sweep-noise-20`` for another base."""
    value = check_value(axis, value)
    text = value if isinstance(value, str) else f"{value:g}"
    return f"sweep-{axis}-{text}" if base == DEFAULT_BASE else f"{base}-sweep-{axis}-{text}"


def sweep_profile(axis: str, value: float | str, base: str = DEFAULT_BASE) -> SiteProfile:
    """The profile of ``base`` with ``axis`` set to ``value`` (name from :func:`sweep_name`)."""
    if base not in SITE_PROFILES:
        raise ValueError(f"sweep base {base!r}: not a phantom site; choose one of {', '.join(SITE_PROFILES)}")
    value = check_value(axis, value)
    p = SITE_PROFILES[base]
    return dataclasses.replace(
        p, name=sweep_name(axis, value, base), base=base, sweep=(axis, value),
        description=f"{base} with {axis} = {value if isinstance(value, str) else f'{value:g}'} "
                    f"{'' if AXES[axis].categorical else AXES[axis].unit}".rstrip(),
        **AXES[axis].fields(value))


def sweep_profiles(axis: str, values: Sequence[float | str], base: str = DEFAULT_BASE) -> dict[str, SiteProfile]:
    """One derived profile per value, by site name, in the given order (duplicates dropped)."""
    if isinstance(values, (str, bytes)) or not len(values):
        raise ValueError(f"sweep {axis}: give a list of values; {_axis(axis).describe()}")
    profiles = [sweep_profile(axis, v, base) for v in values]
    return {p.name: p for p in profiles}


def parse_sweep_name(name: str) -> SiteProfile | None:
    """The profile a sweep site name stands for, or None when ``name`` is not a sweep name
    (a sweep name with a bad axis or value raises the axis' error)."""
    m = _NAME.match(name)
    if m is None or (m["base"] or DEFAULT_BASE) not in SITE_PROFILES:
        return None
    return sweep_profile(m["axis"], m["value"], m["base"] or DEFAULT_BASE)


def parse_sweep_spec(spec: str) -> tuple[str, list[float | str]]:
    """``"noise=5,10,20"`` -> ``("noise", [5.0, 10.0, 20.0])`` (the CLI's ``--sweep``)."""
    axis, sep, values = spec.partition("=")
    axis = axis.strip()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not items:
        raise ValueError(f"--sweep {spec!r}: write AXIS=V1,V2,... (e.g. noise=5,10,20); {_axes_help()}")
    return axis, [check_value(axis, v) for v in items]


def sweep_sites(sweeps: Mapping[str, Sequence[float | str]], base: str = DEFAULT_BASE) -> list[SiteProfile]:
    """The base profile followed by every sweep profile of ``sweeps`` (axis -> values)."""
    if not sweeps:
        raise ValueError(f"sweeps: name at least one axis with values, e.g. {{'noise': [5, 20]}}; {_axes_help()}")
    out: dict[str, SiteProfile] = {}
    for axis, values in sweeps.items():
        out.update(sweep_profiles(axis, values, base))
    if base not in SITE_PROFILES:
        raise ValueError(f"sweep base {base!r}: not a phantom site; choose one of {', '.join(SITE_PROFILES)}")
    return [SITE_PROFILES[base], *out.values()]


SEVERITY_ZERO_PART = "severity-0"
"""``part`` of the rows :func:`severity_zero_rows` adds (a per-case table's ``part`` column)."""


def base_level(record: Mapping[str, Any]) -> float | None:
    """Where the base site sits on a sweep's axis: the mean of the base profile's own range on it
    (``record["base_value"]`` from :func:`sweep_record`), or None for a categorical axis (``phase``)."""
    if AXES[record["axis"]].categorical:
        return None
    value = record["base_value"]
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return sum(values) / len(values)


def severity_zero_rows(rows: Sequence[Mapping[str, Any]], sweeps: Mapping[str, Mapping[str, Any]]
                       ) -> list[dict[str, Any]]:
    """Severity 0 of every robustness curve: the base site's own cases, as rows of each sweep axis.

    Args:
        rows: per-case rows (``site``, ``axis`` empty off sweeps, and any other columns: ``arm``,
            ``seed``, ``source_site``, ``dice``, ...), e.g. one cell's or a whole study's.
        sweeps: dataset.json's ``sweeps``: sweep site -> :func:`sweep_record` (``axis``, ``base``,
            ``base_value``, ...).

    Returns:
        New rows (the inputs are not changed): for every numeric axis swept from a base site, a copy
        of each of that base site's rows that is not itself a sweep row, with ``axis`` = the axis,
        ``severity`` = :func:`base_level` and ``part`` = :data:`SEVERITY_ZERO_PART`. Its arm, seed,
        source site, role and metrics are the original row's, so each cell's severity 0 is scored by
        the very model of its other severities. Categorical axes (``phase``) get none.
    """
    axes: dict[tuple[str, str], float] = {}
    for record in sweeps.values():
        level = base_level(record)
        if level is not None:
            axes.setdefault((str(record["axis"]), str(record["base"])), level)
    out = []
    for (axis, base), level in axes.items():
        for row in rows:
            if row.get("site") == base and row.get("axis") in (None, ""):
                out.append({**row, "axis": axis, "severity": level, "part": SEVERITY_ZERO_PART})
    return out


def sweep_record(profile: SiteProfile) -> dict[str, Any]:
    """What dataset.json's ``sweeps`` says of one sweep site: axis, value, unit, base and the base's
    own range on that axis (for plotting the base beside the sweep)."""
    axis, value = profile.sweep
    field_name = next(iter(AXES[axis].fields(value)))
    base_value = getattr(SITE_PROFILES[profile.base], field_name)
    return {"axis": axis, "value": value, "unit": AXES[axis].unit, "base": profile.base,
            "base_value": list(base_value) if isinstance(base_value, tuple) else base_value}
