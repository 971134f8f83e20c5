"""Site profiles: how seven hospitals' scanners and protocols differ, as data.

Each figure is a range; a case draws one value inside it. Sizes in mm are clinical (``scale=1``);
blur and noise correlation are in pixels, so a site keeps its texture at every ``scale``.
docs/PHANTOM.md tabulates these profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualssl.data.phantom.tissues import PHASES, Tissue, hu_range

HU_TOLERANCE = 10.0
"""Slack (HU) around a calibrated tissue range for the median measured in an organ's core."""


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition and reconstruction of one site (ranges are (low, high), drawn per case)."""

    name: str
    description: str
    phase: str
    """Contrast phase: ``portal``, ``pancreatic`` (late arterial) or ``native``; drives organ HU."""
    pixel_mm: tuple[float, float]
    """In-plane pixel size at scale 1."""
    slice_mm: tuple[float, ...]
    """Slice thickness(es) at scale 1 (= slice spacing); one is chosen per case."""
    noise_hu: tuple[float, float]
    """Std of the image noise (HU) for an average-sized patient."""
    noise_kind: str
    """``white`` (filtered back-projection), ``blotchy`` (iterative reconstruction), ``sharp``."""
    noise_corr_px: float
    """In-plane correlation length of the noise, pixels."""
    blur_px: float
    """Reconstruction blur (Gaussian sigma, pixels)."""
    orientation: str
    """Axis codes of the stored array, e.g. ``LAI``; the affine matches, so RAS is recoverable."""
    dtype: str
    """Stored data type: ``int16``, ``int32`` or ``float32``."""
    hu_scale: tuple[float, float] = (1.0, 1.0)
    hu_offset: tuple[float, float] = (-2.0, 2.0)
    """Stored value = hu_scale * HU + hu_offset (calibration error of the scanner)."""
    sharpen: float = 0.0
    """Edge enhancement of a sharp kernel (unsharp-mask gain)."""
    fov_mm: float = 500.0
    """Reconstruction field of view (square); the body is cropped to it."""
    fov_circle_mm: tuple[float, float] = (0.0, 0.0)
    """Diameter of a truncated circular field of view (cone beam); 0 = none."""
    cupping_hu: tuple[float, float] = (0.0, 0.0)
    """Drop of the values at the centre of the field of view (cone-beam cupping)."""
    shading_hu: float = 0.0
    """Std of a slow shading field over the body (cone-beam scatter)."""
    ring_hu: float = 0.0
    """Amplitude of concentric ring artefacts."""
    streak_hu: float = 0.0
    """Amplitude of straight streaks across the field of view (cone-beam scatter and motion)."""
    oral_contrast: float = 0.0
    """Probability that a case has positive oral contrast in the bowel."""
    fatty_range: tuple[float, float] = (0.0, 0.12)
    """Interlobular fat fraction of the pancreas in this site's population."""
    base: str = ""
    """Site this profile derives from (severity sweeps, ``sweeps.py``): its case seeds are drawn from the
    base's name (offset by ``generate.SWEEP_PATIENTS``), so every severity of a sweep holds the same
    patients, none of them the base site's own; '' = none."""
    sweep: tuple = ()
    """``(axis, value)`` of a sweep profile (see :data:`dualssl.data.phantom.sweeps.AXES`); () = none."""

    @property
    def seed_site(self) -> str:
        """The name the case seeds are drawn from: the base's for a derived profile, else its own."""
        return self.base or self.name

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"site {self.name}: phase {self.phase!r}, choose one of {', '.join(PHASES)}")
        if self.dtype not in ("int16", "int32", "float32"):
            raise ValueError(f"site {self.name}: dtype {self.dtype!r}, choose int16, int32 or float32")
        if sorted(self.orientation.upper().replace("L", "R").replace("P", "A").replace("I", "S")) != list("ARS"):
            raise ValueError(f"site {self.name}: orientation {self.orientation!r} is not three axis codes "
                             "such as LAI or RAS")

    def expected_hu(self, tissue: Tissue | tuple[Tissue, ...]) -> tuple[float, float]:
        """Range (HU as stored) for the median of ``tissue`` (or of several together) in its core:
        the phase's range, the pancreas diluted by up to ``fatty_range[1]`` of interlobular fat,
        calibrated, lowered by cupping, widened by 2.5 shading std and ``HU_TOLERANCE``."""
        if isinstance(tissue, tuple):
            ranges = [self.expected_hu(t) for t in tissue]
            return min(r[0] for r in ranges), max(r[1] for r in ranges)
        lo, hi = hu_range(self.phase, tissue)
        if tissue == Tissue.PANCREAS:
            fat = self.fatty_range[1]
            lo = (1 - fat) * lo + fat * hu_range(self.phase, Tissue.VISCERAL_FAT)[0]
        values = [s * v + o for s in self.hu_scale for v in (lo, hi) for o in self.hu_offset]
        slack = HU_TOLERANCE + 2.5 * self.shading_hu
        return min(values) - slack - self.cupping_hu[1], max(values) + slack


_PROFILES = [
    SiteProfile(
        "pv_standard", "portal-venous phase, soft kernel, like the NIH Pancreas-CT scans",
        phase="portal", pixel_mm=(0.70, 0.90), slice_mm=(1.0,), noise_hu=(10.0, 12.0),
        noise_kind="white", noise_corr_px=0.6, blur_px=0.7, orientation="LAI", dtype="int16",
        oral_contrast=0.6),
    SiteProfile(
        "pancreatic_thin", "pancreatic (late arterial) phase, thin slices, iterative reconstruction",
        phase="pancreatic", pixel_mm=(0.66, 0.80), slice_mm=(1.0,), noise_hu=(7.0, 9.0),
        noise_kind="blotchy", noise_corr_px=1.2, blur_px=0.6, orientation="LPS", dtype="int16",
        fov_mm=340.0, oral_contrast=0.0),
    SiteProfile(
        "native_thick", "non-contrast, thick slices, older population (like the TotalSegmentator example)",
        phase="native", pixel_mm=(0.75, 0.95), slice_mm=(3.0, 4.0, 5.0), noise_hu=(10.0, 13.0),
        noise_kind="white", noise_corr_px=0.8, blur_px=0.8, orientation="RAS", dtype="int32",
        oral_contrast=0.2, fatty_range=(0.03, 0.2)),
    SiteProfile(
        "lowdose_sharp", "low-dose portal-venous scan with a sharp (bone-like) kernel",
        phase="portal", pixel_mm=(0.65, 0.80), slice_mm=(2.0,), noise_hu=(25.0, 40.0),
        noise_kind="sharp", noise_corr_px=0.8, blur_px=0.4, sharpen=0.6, orientation="LPI",
        dtype="int16", oral_contrast=0.4),
    SiteProfile(
        "ir_smooth", "strong iterative reconstruction (waxy correlated noise), recalibrated HU",
        phase="portal", pixel_mm=(0.70, 0.85), slice_mm=(2.0,), noise_hu=(6.0, 8.0),
        noise_kind="blotchy", noise_corr_px=2.0, blur_px=1.0, orientation="RAI", dtype="float32",
        hu_scale=(1.04, 1.08), hu_offset=(8.0, 16.0), oral_contrast=0.5),
    SiteProfile(
        "legacy_5mm", "old scanner: 5 mm slices, strong partial volume and blur, drifted calibration",
        phase="portal", pixel_mm=(0.85, 0.98), slice_mm=(5.0,), noise_hu=(13.0, 16.0),
        noise_kind="white", noise_corr_px=0.7, blur_px=0.9, orientation="RPS", dtype="int16",
        hu_scale=(0.93, 0.97), hu_offset=(-30.0, -15.0), oral_contrast=0.7, fatty_range=(0.0, 0.15)),
    SiteProfile(
        "cone_beam", "radiotherapy cone-beam CT: HU offset, cupping, truncated field of view, rings and streaks",
        phase="portal", pixel_mm=(0.90, 1.00), slice_mm=(2.0,), noise_hu=(18.0, 22.0),
        noise_kind="white", noise_corr_px=1.0, blur_px=1.2, orientation="LAS", dtype="int16",
        hu_scale=(0.95, 1.05), hu_offset=(-200.0, -100.0), fov_circle_mm=(270.0, 320.0),
        cupping_hu=(40.0, 80.0), shading_hu=10.0, ring_hu=6.0, streak_hu=12.0, oral_contrast=0.0),
]

SITE_PROFILES: dict[str, SiteProfile] = {p.name: p for p in _PROFILES}
"""The seven sites, by name, in a fixed order."""


def get_profile(site: str | SiteProfile) -> SiteProfile:
    """The profile of ``site``: a profile, one of :data:`SITE_PROFILES` or a sweep name such as
    ``sweep-noise-20`` (:func:`dualssl.data.phantom.sweeps.sweep_profile`); a clear error otherwise."""
    if isinstance(site, SiteProfile):
        return site
    if site in SITE_PROFILES:
        return SITE_PROFILES[site]
    from dualssl.data.phantom.sweeps import parse_sweep_name  # sweeps builds on this module

    profile = parse_sweep_name(site)
    if profile is None:
        raise ValueError(f"unknown phantom site {site!r}; known sites: {', '.join(SITE_PROFILES)}, or a "
                         "severity sweep named sweep-AXIS-VALUE (e.g. sweep-noise-20; see docs/PHANTOM.md)")
    return profile
