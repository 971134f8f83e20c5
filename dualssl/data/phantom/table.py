"""The scanner's field of view around the patient, and the table the patient lies on.

``fov="body"`` (the default) crops each slice to the body (plus a few mm), as the phantom always has.
``fov="scanner"`` reconstructs what a clinical scan shows: a square field of view centred at the
isocentre, as wide as the technologist chose for this patient (the body plus 40-120 mm, at most the
site's ``fov_mm``), with air around the body and the table below it. The table is two thin curved
carbon-fibre shells (peaks of 130-200 HU at 0.86 mm on NIH PANCREAS_0001) 30-40 mm apart over foam, 15-35 mm
under the patient's back (mattress), rising towards the sides; foam and mattress read as air.
"""

from __future__ import annotations

import numpy as np

from dualssl.data.phantom.painters import Paint
from dualssl.data.phantom.shapes import Where
from dualssl.data.phantom.tissues import Tissue as T

FOVS = ("body", "scanner")
SHELL_MM = 2.5
"""Shell thickness: the real 1.8 mm, thickened so that a 1.6 mm pixel (scale 0.5) never misses it."""
HALF_WIDTH_MM = 235.0


def check_fov(fov: str) -> str:
    if fov not in FOVS:
        raise ValueError(f"fov={fov!r}: choose one of {', '.join(FOVS)} (body = cropped to the body, the "
                         "default; scanner = the reconstructed field of view with the table)")
    return fov


def table(rng: np.random.Generator, b_post: float) -> list:
    """Painters of the two table shells under a patient whose back (body frame) lies at ``-b_post``."""
    pad = float(rng.uniform(15, 35))
    gap = float(rng.uniform(30, 40))
    rise = float(rng.uniform(25, 50)) / HALF_WIDTH_MM ** 2   # mm of rise per mm^2 from the midline
    top = -b_post - pad

    def shells(x, y, z):
        curve = top + np.float32(rise) * x * x
        upper = np.abs(y - curve) < SHELL_MM / 2
        lower = np.abs(y - (curve - np.float32(gap))) < SHELL_MM / 2
        return (upper | lower) & (np.abs(x) < HALF_WIDTH_MM)

    lo = np.array([-HALF_WIDTH_MM, top - gap - SHELL_MM, -1e4])
    hi = np.array([HALF_WIDTH_MM, top + rise * HALF_WIDTH_MM ** 2 + SHELL_MM, 1e4])
    return [Paint(Where(lo, hi, shells), T.TABLE, only=(T.AIR,))]


def scanner_half_width(rng: np.random.Generator, body_half_width: float, back_mm: float, fov_mm: float) -> float:
    """Half the side of the reconstructed square field of view for this patient (mm): the body's half
    width plus 20-60 mm, and at least the upper table shell (``back_mm`` behind the isocentre plus the
    mattress); at most half the site's ``fov_mm``."""
    return min(fov_mm / 2, max(body_half_width + float(rng.uniform(20, 60)), back_mm + 45.0))
