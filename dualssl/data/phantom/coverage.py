"""How much of the trunk a case covers cranio-caudally, and the anatomy only a long scan shows.

``abdomen`` (the default) crops from the lower kidney pole to just under the liver dome (130-175 mm).
``long`` covers what a clinical abdominal scan such as NIH Pancreas-CT PANCREAS_0001 covers (240 mm
from the lung bases to the iliac crests): the crop grows by :data:`COVERAGES` mm at each end, and the
heart above the diaphragm and the iliac wings below the kidneys are painted. A segmenter trained on the
short crop has never seen the tissue a real scan shows above and below it.
"""

from __future__ import annotations

import numpy as np

from dualssl.data.phantom.painters import Paint
from dualssl.data.phantom.shapes import Ellipsoid, Section, Subtract, Where, rotation
from dualssl.data.phantom.tissues import Tissue as T

COVERAGES: dict[str, tuple[float, float]] = {"abdomen": (0.0, 0.0), "long": (50.0, 45.0)}
"""Coverage name -> (mm added below the lower kidney pole, mm added above the crop's top), times the
case's cranio-caudal scale."""


def check_coverage(coverage: str) -> str:
    if coverage not in COVERAGES:
        raise ValueError(f"coverage={coverage!r}: choose one of {', '.join(COVERAGES)} "
                         "(abdomen = kidney poles to liver dome, the default; long = lung bases to iliac crests)")
    return coverage


def crop_range(coverage: str, z_lo: float, z_hi: float, h: float) -> tuple[float, float]:
    """Body-frame z (mm) of the crop for ``coverage``, from the abdominal crop ``(z_lo, z_hi)``."""
    below, above = COVERAGES[check_coverage(coverage)]
    return z_lo - below * h, z_hi + above * h


def heart(yC: float, z_dome: float, f: float, h: float) -> list:
    """Pericardial fat, myocardium and blood pool on the diaphragm, left of the midline and in front."""
    c = np.array([-18.0 * f, yC + 22.0, z_dome + 38.0 * h])
    r = np.array([58.0 * f, 46.0, 52.0 * h])
    rot = rotation(-35.0, 0.0, 25.0)                  # apex to the left, forward and down
    lung_side = (T.LUNG, T.VISCERAL_FAT, T.LIVER, T.STOMACH_CONTENT, T.STOMACH_WALL, T.GAS)
    return [Paint(Ellipsoid(c, r + 5.0, rot), T.VISCERAL_FAT, only=lung_side),
            Paint(Ellipsoid(c, r, rot), T.MUSCLE, only=lung_side),
            Paint(Subtract(Ellipsoid(c, r - 10.0, rot), Ellipsoid(c + rot @ [r[0] * 0.6, 0, 0], r * 0.35, rot)),
                  T.AORTA, only=(T.MUSCLE,))]


def iliac_wings(cav: Section, yV: float, z_crest: float, z_bottom: float) -> list:
    """Both iliac wings: curved plates of cortical shell and marrow that flare from the sacroiliac joints
    to the sides of the lower abdomen, below ``z_crest``."""
    a_cav = cav.a

    def wing(x, y, z, half=4.0):
        side = np.sign(x)
        cx, cy, ax, ay = side * 0.42 * a_cav, np.float32(yV + 20.0), np.float32(0.5 * a_cav), np.float32(48.0)
        rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
        lateral = (x - cx) * side > -0.25 * ax
        crest = z < z_crest - 0.15 * np.abs(y - cy)   # the crest is highest at the side
        return (np.abs(rho - 1) * ay < half) & lateral & crest & (y < cy + 0.8 * ay) & (np.abs(x) > 30)

    lo, hi = np.array([-a_cav, yV - 40.0, z_bottom]), np.array([a_cav, yV + 70.0, z_crest])
    soft = (T.VISCERAL_FAT, T.MUSCLE, T.BOWEL_WALL, T.BOWEL_CONTENT, T.BOWEL_FLUID, T.GAS, T.COLON_WALL, T.STOOL)
    return [Paint(Where(lo, hi, wing), T.CORTICAL_BONE, only=soft),
            Paint(Where(lo, hi, lambda x, y, z: wing(x, y, z, 2.2)), T.BONE, only=(T.CORTICAL_BONE,))]
