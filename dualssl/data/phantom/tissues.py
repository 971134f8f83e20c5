"""Tissue classes of the phantom and their CT numbers per contrast phase (data, not code).

HU ranges come from /work/shared/data/README.md and site_stats.json where they give one
(pancreas 80-110 portal / 40-50 native / 110-140 pancreatic phase; liver 100-120, native 50-65;
spleen 100-120, native 40-55; fat about -100; aorta 150-180, pancreatic phase 250-350, native 40-50);
the rest are textbook figures. Each case draws one value inside each range (a shared bolus-timing
draw keeps the organs of one case coherent).
"""

from __future__ import annotations

from enum import IntEnum


class Tissue(IntEnum):
    """Voxel classes of the organ map (uint8)."""

    AIR = 0
    SKIN = 1
    SUBCUT_FAT = 2
    MUSCLE = 3
    VISCERAL_FAT = 4
    BONE = 5
    CORTICAL_BONE = 6
    DISC = 7
    CSF = 8
    LUNG = 9
    LIVER = 10
    LIVER_VESSEL = 11
    GALLBLADDER = 12
    SPLEEN = 13
    KIDNEY = 14
    KIDNEY_MEDULLA = 15
    STOMACH_WALL = 16
    STOMACH_CONTENT = 17
    GAS = 18
    BOWEL_WALL = 19
    BOWEL_CONTENT = 20
    COLON_WALL = 21
    STOOL = 22
    DUODENUM = 23
    PANCREAS = 24
    AORTA = 25
    ARTERY = 26
    IVC = 27
    PORTAL_VEIN = 28
    SMV = 29
    SPLENIC_VEIN = 30
    RENAL_VEIN = 31
    BOWEL_FLUID = 32
    """Bowel content that oral contrast has not reached (water-like in every case)."""
    TABLE = 33
    """The shells of the patient table (``fov="scanner"`` only; ``table.py``)."""


PHASES = ("portal", "pancreatic", "native")

_SOFT = {  # same in every phase
    Tissue.AIR: (-1000, -1000),
    Tissue.SUBCUT_FAT: (-112, -95),
    Tissue.VISCERAL_FAT: (-108, -90),
    Tissue.BONE: (170, 260),
    Tissue.CORTICAL_BONE: (650, 900),
    Tissue.DISC: (70, 100),
    Tissue.CSF: (5, 20),
    Tissue.LUNG: (-880, -820),
    Tissue.GALLBLADDER: (0, 20),
    Tissue.STOMACH_CONTENT: (0, 25),
    Tissue.GAS: (-990, -940),
    Tissue.BOWEL_CONTENT: (5, 30),
    Tissue.BOWEL_FLUID: (0, 25),
    Tissue.STOOL: (-40, 30),
    Tissue.TABLE: (450, 750),  # thin: blur and 1.6 mm pixels bring its peak to the NIH scan's 130-200 HU
}

_PHASE = {
    "portal": {
        Tissue.SKIN: (30, 60), Tissue.MUSCLE: (50, 65),
        Tissue.LIVER: (100, 120), Tissue.LIVER_VESSEL: (150, 185),
        Tissue.SPLEEN: (100, 120), Tissue.KIDNEY: (160, 200), Tissue.KIDNEY_MEDULLA: (145, 185),
        Tissue.STOMACH_WALL: (85, 110), Tissue.BOWEL_WALL: (85, 110), Tissue.COLON_WALL: (75, 100),
        Tissue.DUODENUM: (85, 110), Tissue.PANCREAS: (85, 110),
        Tissue.AORTA: (150, 180), Tissue.ARTERY: (150, 180), Tissue.IVC: (125, 160),
        Tissue.PORTAL_VEIN: (160, 190), Tissue.SMV: (155, 185), Tissue.SPLENIC_VEIN: (155, 185),
        Tissue.RENAL_VEIN: (150, 185),
    },
    "pancreatic": {
        Tissue.SKIN: (35, 60), Tissue.MUSCLE: (55, 68),
        Tissue.LIVER: (65, 85), Tissue.LIVER_VESSEL: (80, 115),
        Tissue.SPLEEN: (110, 140), Tissue.KIDNEY: (190, 250), Tissue.KIDNEY_MEDULLA: (80, 120),
        Tissue.STOMACH_WALL: (95, 125), Tissue.BOWEL_WALL: (95, 125), Tissue.COLON_WALL: (80, 105),
        Tissue.DUODENUM: (95, 125), Tissue.PANCREAS: (110, 140),
        Tissue.AORTA: (250, 350), Tissue.ARTERY: (250, 350), Tissue.IVC: (90, 130),
        Tissue.PORTAL_VEIN: (130, 170), Tissue.SMV: (115, 150), Tissue.SPLENIC_VEIN: (140, 180),
        Tissue.RENAL_VEIN: (170, 220),
    },
    "native": {
        Tissue.SKIN: (25, 45), Tissue.MUSCLE: (45, 55),
        Tissue.LIVER: (50, 65), Tissue.LIVER_VESSEL: (35, 45),
        Tissue.SPLEEN: (40, 55), Tissue.KIDNEY: (28, 40), Tissue.KIDNEY_MEDULLA: (22, 34),
        Tissue.STOMACH_WALL: (35, 45), Tissue.BOWEL_WALL: (35, 45), Tissue.COLON_WALL: (30, 42),
        Tissue.DUODENUM: (35, 45), Tissue.PANCREAS: (40, 50),
        Tissue.AORTA: (40, 50), Tissue.ARTERY: (40, 50), Tissue.IVC: (38, 48),
        Tissue.PORTAL_VEIN: (38, 48), Tissue.SMV: (38, 48), Tissue.SPLENIC_VEIN: (38, 48),
        Tissue.RENAL_VEIN: (38, 48),
    },
}

ORAL_CONTRAST_HU = (150.0, 300.0)
"""Positive oral contrast in bowel, duodenal and stomach content (when a case has it)."""

TEXTURE_HU = {
    # Std (HU) of slow, organ-scale heterogeneity (wavelength ~15 mm); noise comes on top.
    Tissue.SUBCUT_FAT: 5, Tissue.VISCERAL_FAT: 7, Tissue.MUSCLE: 5, Tissue.LIVER: 3, Tissue.SPLEEN: 3,
    Tissue.KIDNEY: 5, Tissue.KIDNEY_MEDULLA: 6, Tissue.BONE: 35, Tissue.LUNG: 30, Tissue.PANCREAS: 3,
    Tissue.BOWEL_CONTENT: 8, Tissue.BOWEL_FLUID: 6, Tissue.STOMACH_CONTENT: 6, Tissue.STOOL: 70,
}
SPLEEN_ARTERIAL_TEXTURE_HU = 14.0
"""Arciform heterogeneity of the spleen in the pancreatic (late arterial) phase."""


def hu_range(phase: str, tissue: Tissue) -> tuple[float, float]:
    """True (uncalibrated) HU range of ``tissue`` in ``phase``."""
    if phase not in _PHASE:
        raise ValueError(f"contrast phase {phase!r}: choose one of {', '.join(PHASES)}")
    table = _PHASE[phase]
    lo, hi = table[tissue] if tissue in table else _SOFT[tissue]
    return float(lo), float(hi)
