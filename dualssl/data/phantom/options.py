"""What a phantom case shows besides its site's scanner and protocol, and named presets of it.

A site profile (``sites.py``) says how a scanner images; :class:`PhantomOptions` says how much of
the patient is scanned and what surrounds the pancreas. The defaults are the phantom as it has
always been (small, fast cases: every existing dataset is unchanged byte for byte). The
``clinical`` preset is closer to what a clinical abdominal scan such as NIH PANCREAS_0001 shows,
measured against it in docs/PHANTOM.md ("Sim-to-real transfer").
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from dualssl.data.phantom.coverage import check_coverage
from dualssl.data.phantom.table import check_fov


@dataclass(frozen=True)
class BowelClearance:
    """How close small-bowel loops come to the pancreas: no loop seed within ``gap_mm`` +
    ``spacing_factor`` x loop spacing of its surface; loops fill the cavity up to ``zone_top_mm``
    (body frame z; the pancreas body lies near z = 10 mm, its tail higher)."""

    zone_top_mm: float
    gap_mm: float
    spacing_factor: float


CONTEXTS: dict[str, BowelClearance] = {
    "fat": BowelClearance(zone_top_mm=10.0, gap_mm=8.0, spacing_factor=0.8),
    "packed": BowelClearance(zone_top_mm=30.0, gap_mm=0.0, spacing_factor=0.2),
}
"""Peri-pancreatic context -> bowel clearance. ``fat``: a retroperitoneal fat plane of 8 mm or more
keeps the loops off the gland (the default; about half of a 9-12 mm ring around it is fat).
``packed``: jejunal loops abut the body and tail, as in a thin patient (NIH PANCREAS_0001: 17% fat in
that ring)."""


@dataclass(frozen=True)
class PhantomOptions:
    """Patient-side options of a phantom case (validated on construction)."""

    coverage: str = "abdomen"
    """Cranio-caudal extent (``coverage.COVERAGES``): abdomen (kidney poles to liver dome) or long
    (lung bases to iliac crests)."""
    fov: str = "body"
    """In-plane field of view (``table.FOVS``): body (cropped to the body) or scanner (the
    reconstructed square with air around the body and the table under it)."""
    context: str = "fat"
    """What surrounds the pancreas (:data:`CONTEXTS`): fat or packed."""
    pancreas_fat: float = 1.0
    """Multiplies the site's range of interlobular fat in the pancreas (0 = a lean gland, as in a
    young patient; 1 = the site's own range)."""

    def __post_init__(self) -> None:
        check_coverage(self.coverage)
        check_fov(self.fov)
        if self.context not in CONTEXTS:
            raise ValueError(f"context={self.context!r}: choose one of {', '.join(CONTEXTS)} (fat = a fat plane "
                             "around the pancreas, the default; packed = bowel loops abut it)")
        if not (isinstance(self.pancreas_fat, (int, float)) and 0.0 <= float(self.pancreas_fat) <= 3.0):
            raise ValueError(f"pancreas_fat={self.pancreas_fat!r}: must lie in [0, 3] (a factor on the site's "
                             "interlobular fat range; 0 = lean, 1 = the site's own)")

    @property
    def clearance(self) -> BowelClearance:
        return CONTEXTS[self.context]

    def changes(self) -> dict[str, object]:
        """The fields that differ from the defaults (what dataset.json and each case's info record)."""
        default = PhantomOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


PRESETS: dict[str, PhantomOptions] = {
    "default": PhantomOptions(),
    "clinical": PhantomOptions(coverage="long", context="packed", pancreas_fat=0.0),
}
"""Named phantom presets (``dualssl phantom --preset NAME``; flags given beside it override its fields).
``clinical`` holds the options that improved transfer to the NIH scan (docs/PHANTOM.md); ``fov="scanner"``
did not, so it stays out of the preset."""


def phantom_options(spec: PhantomOptions | str | None = None, **overrides: object) -> PhantomOptions:
    """A :class:`PhantomOptions` from a preset name, an instance or None (the defaults), with
    ``overrides`` (None values ignored) applied on top."""
    if spec is None:
        base = PhantomOptions()
    elif isinstance(spec, PhantomOptions):
        base = spec
    elif isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"phantom preset {spec!r}: choose one of {', '.join(PRESETS)}")
        base = PRESETS[spec]
    else:
        raise TypeError(f"phantom options: expected a preset name or PhantomOptions, got {type(spec).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(PhantomOptions)}
    if unknown:
        raise ValueError(f"phantom options: unknown field(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(f.name for f in fields(PhantomOptions))}")
    return replace(base, **given)
