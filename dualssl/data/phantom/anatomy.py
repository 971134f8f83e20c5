"""One random abdomen: organ shapes in the body frame (mm, RAS, origin at the body's axis at the
level of the portal confluence), the pancreas, and the patient's pose on the table.

Positions come from landmarks measured on the NIH scan (../shared/data, PANCREAS_0001) and
textbook anatomy: vertebral body ~75 mm in front of the posterior skin, aorta ~32 mm in front of
its centre, portal/splenic confluence ~18 mm further; kidneys beside the spine; pancreas head in
the duodenal C-loop, right of the SMV, in front of the IVC; body over the aorta and SMA; splenic
vein along its back; tail at the splenic hilum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dualssl.data.phantom.coverage import crop_range, heart, iliac_wings
from dualssl.data.phantom.fields import SmoothField
from dualssl.data.phantom.options import CONTEXTS, BowelClearance, PhantomOptions
from dualssl.data.phantom.painters import BowelLoops, Hollow, Paint
from dualssl.data.phantom.shape_bank import place_bank_pancreas
from dualssl.data.phantom.shapes import (Ellipsoid, Intersect, Section, SoftUnion, Subtract, Tube,
                                         Where, rotation)
from dualssl.data.phantom.table import table
from dualssl.data.phantom.tissues import Tissue as T

CAVITY = (T.VISCERAL_FAT, T.BOWEL_WALL, T.BOWEL_CONTENT, T.BOWEL_FLUID, T.GAS, T.COLON_WALL, T.STOOL)
"""Classes that organs may displace (fat and bowel fill the leftover space)."""
SOLID = CAVITY + (T.LIVER, T.SPLEEN, T.STOMACH_WALL, T.STOMACH_CONTENT, T.DUODENUM, T.GALLBLADDER,
                  T.KIDNEY, T.KIDNEY_MEDULLA, T.PANCREAS, T.MUSCLE)


@dataclass
class Pancreas:
    """The pancreas: a tube along a spline from the uncinate process to the tail tip."""

    tube: Tube
    region_s: np.ndarray
    """Normalised arc length (M,) of each centreline sample (0 = uncinate tip, 1 = tail tip)."""
    fat: SmoothField
    """Lobular field whose top ``fat_fraction`` becomes interlobular fat (fatty infiltration)."""
    fat_fraction: float
    length_mm: float
    """Centreline length from the head's centre to the tail tip."""
    shape: object | None = None
    """The painted solid when it is not ``tube`` (a real mask from a shape bank, ``shape_bank.py``)."""

    @property
    def painted(self):
        """The solid painted as pancreas: ``shape`` if set, else the procedural ``tube``."""
        return self.shape if self.shape is not None else self.tube


@dataclass
class Anatomy:
    """Painters in order of precedence plus what rendering and tests need to know."""

    painters: list
    rot: np.ndarray
    """Patient pose: ``p_world = rot @ p_body + shift``."""
    shift: np.ndarray
    body: Section
    z_range: tuple[float, float]
    """Body-frame z (mm) of the crop: lower kidney pole to just under the liver dome (``coverage.py``
    lengthens it)."""
    pancreas: Pancreas
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)

    def outline(self, n: int = 90) -> np.ndarray:
        """Points (2n, 3) on the skin at both ends of ``z_range``, body frame, mm."""
        b = self.body
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = np.cos(t), np.sin(t)
        ex = 2.0 / b.n
        pts = []
        for z in self.z_range:
            grow = 1.0 - b.taper / 100.0 * z
            x = b.a * grow * np.sign(c) * np.abs(c) ** ex
            y = b.center_y + np.where(s > 0, b.b_ant, b.b_post) * grow * np.sign(s) * np.abs(s) ** ex
            pts.append(np.stack([x, y, np.full(n, z)], 1))
        return np.vstack(pts)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_anatomy(rng: np.random.Generator, fatty_range: tuple[float, float] = (0.0, 0.12),
                   shape_bank=None, bank_rng: np.random.Generator | None = None,
                   options: PhantomOptions | None = None) -> Anatomy:
    """Draw one abdomen (sizes, positions, rotations, organ volumes) from ``rng``.

    ``fatty_range``: range of the pancreas' interlobular fat fraction (older populations: higher).
    ``shape_bank`` (a :class:`~dualssl.data.phantom.shape_bank.ShapeBank`): paint a real mask, drawn
    and deformed with ``bank_rng``, where the procedural pancreas sits; None = the procedural shape.
    ``options``: coverage of the crop, the table, the pancreas' surroundings and its interlobular fat
    (:class:`~dualssl.data.phantom.options.PhantomOptions`; None = the defaults).
    """
    options = options or PhantomOptions()
    # --- body habitus ---------------------------------------------------------------------------
    adip = _u(rng, 0, 1)
    a = 136 + 36 * adip + _u(rng, -7, 7)              # lateral semi-axis of the skin
    b_post = _u(rng, 100, 122)
    b_ant = 88 + 38 * adip + _u(rng, -6, 6)
    fat = 7 + 28 * adip + _u(rng, -3, 3)              # subcutaneous fat thickness
    f = a / 160.0                                     # lateral scale
    g = b_post / 112.0                                # antero-posterior scale
    h = _u(rng, 0.9, 1.1)                             # cranio-caudal scale
    body = Section(a, b_ant, b_post, n=2.3, taper=_u(rng, -0.02, 0.04), noise=None)
    sc = Section(a - 2.5, b_ant - 2.5, b_post - 2.5, n=2.3, taper=body.taper)
    wall_out = Section(a - 2.5 - 1.1 * fat, b_ant - 2.5 - 1.3 * fat, b_post - 2.5 - 0.6 * fat,
                       center_y=0.0, n=2.3, taper=body.taper)
    wl, wa = _u(rng, 6, 10), _u(rng, 7, 11)                # lateral (obliques), anterior (rectus) muscle
    cav = Section(wall_out.a - wl, wall_out.b_ant - wa, wall_out.b_post - 12, n=2.2, taper=body.taper)
    a_cav = cav.a

    yaw, pitch, roll = _u(rng, -4, 4), _u(rng, -3, 3), _u(rng, -2, 2)
    rot = rotation(yaw, pitch, roll)
    shift = np.array([_u(rng, -15, 15), _u(rng, -12, 12), _u(rng, -350, -150)])
    up = rot.T @ np.array([0.0, 1.0, 0.0])            # gravity points to world -y (supine)

    # --- landmarks ------------------------------------------------------------------------------
    yV = -b_post + 75 * g                             # vertebral body centre
    rvx, rvy = 21 * f ** 0.5, 16 * g ** 0.5
    rA = _u(rng, 9.5, 12.5)
    xA, yA = -_u(rng, 6, 14), yV + rvy + rA + _u(rng, 3, 7)
    xC, yC = _u(rng, 5, 14), yA + _u(rng, 15, 22)     # portal/splenic confluence at z = 0
    xI, yI = xA + _u(rng, 32, 40), yV + rvy + 6       # inferior vena cava
    z_dome = _u(rng, 85, 100) * h
    kid_r = np.array([_u(rng, 23, 28), _u(rng, 24, 29), _u(rng, 46, 56)])
    zk_r, zk_l = -_u(rng, 8, 20) * h, _u(rng, -8, 4) * h           # right kidney lower than left
    z_lo = min(zk_r, zk_l) - kid_r[2]
    z_hi = z_dome - 8
    c_lo, c_hi = crop_range(options.coverage, z_lo, z_hi, h)  # the crop; (z_lo, z_hi) for the default coverage
    lm = {"vertebra": np.array([0, yV, 0]), "aorta": np.array([xA, yA, 0]),
          "confluence": np.array([xC, yC, 0.0]), "ivc": np.array([xI, yI, 0])}

    painters: list = [Paint(body, T.SKIN), Paint(sc, T.SUBCUT_FAT), Paint(wall_out, T.MUSCLE),
                      Paint(cav, T.VISCERAL_FAT)]

    # --- muscles of the back and psoas ------------------------------------------------------------
    for side in (1, -1):
        painters.append(Paint(Ellipsoid(np.array([side * 27 * f, yV - 40 * g, 0]),
                                         np.array([24 * f, 19 * g, 1e4])), T.MUSCLE,
                              only=(T.VISCERAL_FAT, T.SUBCUT_FAT)))
        zs = np.linspace(z_hi, c_lo - 20, 6)
        grow = np.clip((-zs + 0.0) / 90.0, 0, 1)
        knots = np.stack([side * (rvx + 6 + 14 * grow) * f, yV + 2 - 4 * grow, zs], 1)
        painters.append(Paint(Tube.through(knots, 2 + 18 * grow * f), T.MUSCLE, only=(T.VISCERAL_FAT,)))

    # --- small bowel loops (lower abdomen, in front of the aorta): drawn once the pancreas exists ----
    bowel_at = len(painters)

    # --- colon: ascending, transverse, descending --------------------------------------------------
    knots = np.array([[0.74 * a_cav, yV + 20, c_lo - 25], [0.72 * a_cav, yV + 22, -20 * h],
                      [0.45 * a_cav, yC + 40, -30 * h], [-0.1 * a_cav, yC + 50, -40 * h],
                      [-0.55 * a_cav, yC + 30, -10 * h], [-0.78 * a_cav, yV + 25, 20 * h],
                      [-0.8 * a_cav, yV + 12, -25 * h], [-0.8 * a_cav, yV + 10, c_lo - 25]])
    colon = Tube.through(knots, _u(rng, 15, 22), noise=SmoothField.random(rng, 40, gain=0.06))
    t = np.linspace(0, colon.length, len(colon.radii))
    colon.radii = colon.radii * (1 + 0.12 * np.cos(2 * np.pi * t / _u(rng, 18, 26)))  # haustra
    gas_c = np.clip(0.5 + 0.4 * np.sin(t / _u(rng, 30, 60) + _u(rng, 0, 6)), 0, 0.9)
    painters.append(Hollow(colon, 2.0, T.COLON_WALL, T.STOOL, gas_c, up, only=CAVITY))

    # --- liver, gallbladder --------------------------------------------------------------------------
    lv = _u(rng, 0.9, 1.1)
    liver = SoftUnion([
        Ellipsoid(np.array([68 * f, -5 * g, 56 * h]), np.array([74 * f, 85 * g, 62 * h]) * lv),
        Ellipsoid(np.array([98 * f, -15 * g, 12 * h]), np.array([36 * f, 48 * g, 38 * h]) * lv),
        Ellipsoid(np.array([-18 * f, yC + 38, 62 * h]), np.array([62 * f, 34 * g, 36 * h]) * lv,
                  rotation(_u(rng, -15, 5))),
        Ellipsoid(np.array([xI - 8, yI + 20, 42 * h]), np.array([20, 16, 28.0])),
    ], k=0.25, noise=SmoothField.random(rng, 60, gain=0.08))
    painters.append(Paint(liver, T.LIVER, only=CAVITY))
    if rng.uniform() < 0.85:
        gb = Ellipsoid(np.array([55 * f, yC + 40, 8 * h]), np.array([14, 15, 28]) * _u(rng, 0.7, 1.1),
                       rotation(_u(rng, -20, 20), _u(rng, 15, 35)))
        painters.append(Paint(gb, T.GALLBLADDER, only=CAVITY + (T.LIVER,)))

    # --- spleen -------------------------------------------------------------------------------------
    ss = _u(rng, 0.85, 1.15)
    s_c = np.array([-(a_cav - 32 * ss), yV + _u(rng, 0, 15), 48 * h])
    s_rot = rotation(_u(rng, 30, 50) + 180, _u(rng, -10, 10))
    spleen_full = Ellipsoid(s_c, np.array([24, 52, 52]) * ss, s_rot, noise=SmoothField.random(rng, 50, gain=0.05))
    hilum_cut = Ellipsoid(s_c + s_rot @ np.array([-30 * ss, 0, 0]), np.array([18, 40, 45]) * ss, s_rot)
    painters.append(Paint(Subtract(spleen_full, hilum_cut), T.SPLEEN, only=CAVITY + (T.LIVER,)))
    hilum = s_c + np.array([28 * ss, 20 * ss, -18 * ss])

    # --- kidneys (cortex, medulla, sinus fat) --------------------------------------------------------
    for side, zk in ((1, zk_r), (-1, zk_l)):
        c = np.array([side * (52 + 12 * f) , yV - _u(rng, 0, 8), zk])
        r = kid_r * _u(rng, 0.92, 1.08)
        kr = rotation(-side * _u(rng, 20, 35), -side * _u(rng, 6, 14))  # hilum anteromedial, upper pole medial
        medial = kr @ np.array([-side, 0.0, 0.0])          # toward the hilum (anteromedial)
        notch = Ellipsoid(c + medial * r[0] * 1.05, r * [0.5, 0.42, 0.42], kr)
        painters.append(Paint(Subtract(Ellipsoid(c, r, kr, noise=SmoothField.random(rng, 40, gain=0.03)), notch),
                              T.KIDNEY, only=SOLID))
        painters.append(Paint(Ellipsoid(c + medial * 3, r * [0.66, 0.66, 0.8], kr), T.KIDNEY_MEDULLA,
                              only=(T.KIDNEY,)))
        painters.append(Paint(Ellipsoid(c + medial * r[0] * 0.45, r * [0.42, 0.3, 0.5], kr), T.VISCERAL_FAT,
                              only=(T.KIDNEY, T.KIDNEY_MEDULLA)))
        lm[f"kidney_{'right' if side > 0 else 'left'}"] = c

    # --- pancreas ------------------------------------------------------------------------------------
    pancreas = _pancreas(rng, xC, yC, hilum, f, h, fatty_range, options.pancreas_fat)
    if shape_bank is not None:
        pancreas = place_bank_pancreas(shape_bank, bank_rng, pancreas, clear_of=((xA, yA, rA), (xI, yI, 12.0)))
    ptube = pancreas.tube
    clear = options.clearance
    zone = Intersect([cav, Where(np.array([-a, yA + 5, c_lo - 30]), np.array([a, b_ant, clear.zone_top_mm]),
                                 lambda x, y, z: np.ones(x.shape, bool))])
    n_cand = round(1500 * (40 - c_lo) / (40 - z_lo))   # candidate density as in the abdominal crop
    painters.insert(bowel_at, _bowel(rng, zone, up, _u(rng, 18, 24), avoid=ptube, n_candidates=n_cand,
                                     clearance=clear))
    head_i = int(np.argmin(np.abs(pancreas.region_s - 0.18)))
    head = ptube.points[head_i]
    r_head = float(ptube.radii[head_i])
    lm["pancreas_head"] = head

    # --- stomach (fundus to pylorus) and duodenal C-loop ---------------------------------------------
    dist = _u(rng, 0.6, 1.05)
    pylorus = np.array([xC + 22, yC + 40, 14 * h])
    knots = np.array([[-55 * f, yV + 40, z_dome - 30], [-55 * f, yC + 34, 45 * h],
                      [-32 * f, yC + 52, 34 * h], [-4 * f, yC + 52, 20 * h], pylorus])
    stomach = Tube.through(knots, np.array([30, 32, 27, 18, 8]) * np.r_[dist, dist, dist, 1, 1],
                           noise=SmoothField.random(rng, 35, gain=0.05))
    gas_s = np.full(len(stomach.radii), _u(rng, 0.0, 0.4))
    painters.append(Hollow(stomach, 4.0, T.STOMACH_WALL, T.STOMACH_CONTENT, gas_s, up,
                           only=CAVITY + (T.LIVER,)))

    rd = _u(rng, 8, 11)
    x_lat = head[0] + r_head + rd + 1
    z_low = float(ptube.points[:, 2].min()) - float(ptube.radii[0]) - rd - 3
    knots = np.array([pylorus, [x_lat + 4, yC + 22, 8 * h], [x_lat, head[1] + 2, head[2] + 10],
                      [x_lat, head[1] - 2, head[2] - 16], [head[0] - 2, yC - 2, z_low + 2],
                      [xC + 2, yA + rA + rd - 1, z_low], [xA - 20, yA + rA + rd - 2, z_low + 4],
                      [xA - 34, yC, z_low + 24], [xA - 44, yC + 12, -12 * h]])
    duod = Tube.through(knots, rd)
    gas_d = np.clip(rng.uniform(-0.3, 0.5) + 0.1 * np.sin(np.arange(len(duod.radii)) / 15.0), 0, 0.6)
    painters.append(Hollow(duod, 2.5, T.DUODENUM, T.BOWEL_CONTENT, gas_d, up, only=CAVITY + (T.LIVER,)))
    lm["duodenum_d2"] = np.array([x_lat, head[1], head[2]])

    painters.append(Paint(pancreas.painted, T.PANCREAS, only=SOLID))

    # --- liver vessels (portal branches, hepatic veins) ----------------------------------------------
    porta = np.array([xC + 52 * f, yC - 12, 50 * h])
    for kn, rr in (([porta, porta + [35 * f, -10, 12], porta + [62 * f, -22, 6]], [6, 4.5, 3]),
                   ([porta, porta + [-25, 12, 14], porta + [-65 * f, 32, 18]], [5, 4, 2.5])):
        painters.append(Paint(Tube.through(np.array(kn), np.array(rr, float)), T.LIVER_VESSEL, only=(T.LIVER,)))
    top = np.array([xI, yI + 2, z_dome - 14])
    for d, rr in (([70 * f, 5, -28], 5.0), ([20, 45 * g, -40], 4.5), ([-40 * f, 42 * g, -22], 4.0)):
        d = np.array(d, float)
        kn = np.array([top, top + d * 0.55, top + d * 1.15])
        painters.append(Paint(Tube.through(kn, np.array([rr, rr * 0.75, 2.0])), T.LIVER_VESSEL, only=(T.LIVER,)))

    # --- vessels ------------------------------------------------------------------------------------
    z_bot, z_top = c_lo - 30, c_hi + 30
    aorta = Tube.through(np.array([[xA, yA, z_top], [xA, yA + 1, 0], [xA + 1, yA + 3, z_bot]]), rA)
    ivc = Tube.through(np.array([[xI, yI, z_bot], [xI + 2, yI + 2, 0], [xI + 4, yI + 8, z_dome - 10],
                                 [xI + 2, yI + 10, z_top]]), _u(rng, 10, 13), metric=(1.0, 1.4, 1.0))
    sma = Tube.through(np.array([[xA, yA + rA - 3, 10], [xA + 2, yA + rA + 7, 2], [xA + 4, yC + 1, -15],
                                 [xA + 5, yC + 11, -45], [xA + 6, yC + 15, z_bot]]), 3.6)
    smv = Tube.through(np.array([[xC + 3, yC + 14, z_bot], [xC + 2, yC + 11, -40], [xC + 1, yC + 5, -15],
                                 [xC, yC, 0]]), _u(rng, 5, 6.5))
    pv = Tube.through(np.array([[xC, yC, 0], [xC + 24 * f, yC - 8, 24 * h], [xC + 44 * f, yC - 13, 42 * h],
                                porta]), _u(rng, 6, 7.5))
    r_sv = _u(rng, 3.8, 5)
    sv = _splenic_vein(pancreas, np.array([xC, yC, 0.0]), hilum, s_c, r_sv)
    celiac = np.array([xA + 1, yA + rA + 9, 24 * h])
    art = [Tube.through(np.array([[xA, yA + rA - 3, 22 * h], celiac]), 3.5),
           Tube.through(np.array([celiac, [xC + 30 * f, yC - 4, 32 * h], porta + [0, 6, 2]]), 2.6),
           _splenic_artery(rng, pancreas, celiac, hilum)]
    lrv = Tube.through(np.array([lm["kidney_left"] + [25, 18, 8], [xA - 12, yA + 6, -16],
                                 [xA, yA + rA + 2.5, -18], [xI - 4, yI + 2, -14]]), 4.0)
    rrv = Tube.through(np.array([lm["kidney_right"] + [-22, 16, 6], [xI + 2, yI, -18]]), 4.0)
    for tube, tissue in ((aorta, T.AORTA), (ivc, T.IVC), (sma, T.ARTERY), (smv, T.SMV), (pv, T.PORTAL_VEIN),
                         (sv, T.SPLENIC_VEIN), (lrv, T.RENAL_VEIN), (rrv, T.RENAL_VEIN)):
        painters.append(Paint(tube, tissue, only=SOLID + (T.LIVER_VESSEL,)))
    for tube in art:
        painters.append(Paint(tube, T.ARTERY, only=SOLID))
    lm["splenic_vein"] = sv.points[len(sv.points) // 2]

    # --- lung bases above the diaphragm -------------------------------------------------------------
    y_post, y_ant = -cav.b_post, cav.b_ant

    def lung(x, y, z):
        side = np.where(x < 0, np.float32(10), np.float32(0))
        post = np.clip((yV + 10 - y) / (yV + 10 - y_post), 0, 1) ** 1.5
        ant = np.clip((y - yC) / (y_ant - yC), 0, 1) ** 2
        z_dia = z_dome - side - 12 * (x / a_cav) ** 2 - 28 * post - 10 * ant
        return z > z_dia

    painters.append(Paint(Intersect([cav, Where(np.array([-a, -b_post, z_dome - 90]),
                                                np.array([a, b_ant, z_top]), lung)]),
                          T.LUNG, only=SOLID + (T.LIVER_VESSEL, T.STOMACH_CONTENT, T.GAS)))

    # --- ribs, spine ----------------------------------------------------------------------------------
    painters += _ribs(rng, wall_out, cav, max(z_dome + 10, c_hi + 10), h)   # z_dome + 10 for the default crop
    if c_lo < z_lo:
        painters += iliac_wings(cav, yV, z_lo - 20 * h, z_bot)
    if c_hi > z_hi:
        painters += heart(yC, z_dome, f, h)
    painters += _spine(rng, yV, rvx, rvy, z_bot, z_top, h)
    if options.fov == "scanner":
        painters += table(rng, b_post)                 # drawn last: the other draws stay as they were

    return Anatomy(painters, rot, shift, body, (c_lo, c_hi), pancreas, lm)


def _pancreas(rng, xC: float, yC: float, hilum: np.ndarray, f: float, h: float,
              fatty_range: tuple[float, float], fat_factor: float = 1.0) -> Pancreas:
    """Centreline from the uncinate tip through head, neck, body to the tail at the splenic hilum;
    radius profile head 10-17.5, neck 4-7.5, body 7-12.5, tail 7.5-15 mm (half thicknesses)."""
    size = _u(rng, 0.86, 1.22)
    r_head, r_neck = _u(rng, 12, 17) * size, _u(rng, 5, 7.5) * size
    r_body, r_tail = _u(rng, 9, 12.5) * size, _u(rng, 9, 14) * size
    tail = hilum + np.array([_u(rng, 6, 14), _u(rng, 4, 12), _u(rng, -8, 0)])
    knots = np.array([
        [xC + 5, yC - 4, -34 * h],                        # uncinate process, behind the SMV
        [xC + 26 * f, yC - 3, -26 * h],                   # head
        [xC + 28 * f, yC + 4, -8 * h],
        [xC + 5, yC + 13, 3 * h],                         # neck, in front of the confluence
        [xC - 28 * f, yC + 14, 9 * h],                    # body, over the aorta and SMA
        [(xC - 28 * f + tail[0]) / 2 - 4, (yC + 14 + tail[1]) / 2 + 6, (9 * h + tail[2]) / 2],
        tail,                                             # tail, toward the splenic hilum
    ])
    radii = np.array([0.55 * r_head, r_head, 0.92 * r_head, r_neck, r_body, 0.95 * r_body, 0.8 * r_tail])
    lob = SmoothField.random(rng, _u(rng, 8, 14), gain=_u(rng, 0.05, 0.14))
    tube = Tube.through(knots, radii, step_mm=0.6, noise=lob, metric=(1.0, 1.1, 0.72))
    # A rounded tail tip of radius r_tail instead of 0.8 r_tail at the last knot.
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(tube.points, axis=0), axis=1))])
    s = arc / arc[-1]
    tube.radii = np.where(s > 0.85, tube.radii * (1 + 0.25 * np.sin(np.pi * np.clip((s - 0.85) / 0.15, 0, 1))),
                          tube.radii)
    head_i = int(np.argmin(np.linalg.norm(tube.points - knots[1], axis=1)))
    length = float(arc[-1] - arc[head_i])
    fat = SmoothField.random(rng, _u(rng, 5, 9), n_waves=12)
    return Pancreas(tube, s, fat, _u(rng, *fatty_range) * fat_factor, length)


def _splenic_vein(pancreas: Pancreas, confluence: np.ndarray, hilum: np.ndarray, spleen_c: np.ndarray,
                  r_sv: float) -> Tube:
    """Along the back of the pancreas body and tail (touching it), from the confluence to the hilum."""
    tube = pancreas.tube
    sel = np.where(pancreas.region_s > 0.5)[0][::20]
    my = tube.metric[1]
    behind = tube.points[sel] - np.stack([np.zeros(len(sel)), tube.radii[sel] / my * 0.85 + 0.5 * r_sv,
                                          0.1 * tube.radii[sel]], 1)
    knots = np.vstack([confluence, confluence + [-8, -4, 3], behind, hilum + (spleen_c - hilum) * 0.3])
    return Tube.through(knots, r_sv)


def _splenic_artery(rng, pancreas: Pancreas, celiac: np.ndarray, hilum: np.ndarray) -> Tube:
    """Tortuous, along the upper border of the pancreas body and tail."""
    tube = pancreas.tube
    sel = np.where(pancreas.region_s > 0.45)[0][::25]
    above = tube.points[sel] + np.stack([np.zeros(len(sel)), -0.3 * tube.radii[sel],
                                         tube.radii[sel] + 4], 1)
    wiggle = _u(rng, 2, 6) * np.sin(np.arange(len(sel)) * _u(rng, 1.2, 2.2))
    above[:, 1] += wiggle
    knots = np.vstack([celiac, above, hilum + [0, 0, 6]])
    return Tube.through(knots, _u(rng, 2.2, 3.0))


def _bowel(rng, zone, up: np.ndarray, spacing: float, avoid: Tube, n_candidates: int = 1500,
           clearance: BowelClearance = CONTEXTS["fat"]) -> BowelLoops:
    """Seeds at least ``spacing`` apart (dart throwing), loops 0.55-0.8 x spacing in radius, a third
    collapsed, half of the rest reached by oral contrast, a tenth with gas. No seed lies within
    ``clearance`` of ``avoid`` (by default no loop reaches within ~8 mm: the retroperitoneal pancreas
    keeps its fat)."""
    lo, hi = zone.bounds()
    cand = rng.uniform(lo, hi, size=(n_candidates, 3))
    cand = cand[zone.inside(cand[:, 0], cand[:, 1], cand[:, 2])]
    d, i = avoid.nearest(cand[:, 0], cand[:, 1], cand[:, 2])
    cand = cand[~(d < avoid.radii[i] + clearance.spacing_factor * spacing + clearance.gap_mm)]
    seeds = np.empty((0, 3))
    for p in cand:
        if len(seeds) == 0 or np.min(((seeds - p) ** 2).sum(1)) > spacing ** 2:
            seeds = np.vstack([seeds, p])
    n = len(seeds)
    axes = rng.normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    kind = rng.uniform(size=n)
    content = np.where(kind < 0.33, T.BOWEL_WALL, np.where(kind < 0.66, T.BOWEL_CONTENT, T.BOWEL_FLUID))
    gas = np.where((rng.uniform(size=n) < 0.12) & (kind >= 0.33), rng.uniform(0.2, 0.9, n), 0.0)
    return BowelLoops(zone, seeds, rng.uniform(0.55, 0.8, n) * spacing, axes, rng.uniform(0.3, 0.75, n),
                      content.astype(np.uint8), gas, up)


def _ribs(rng, wall_out: Section, cav: Section, z_top: float, h: float) -> list:
    """Ribs: hoops in the body wall sloping down from back to front, up to ``z_top``; none in front of
    the midline."""
    period = _u(rng, 24, 30) * h
    phase = _u(rng, 0, period)
    a_mid, b_mid = (wall_out.a + cav.a) / 2, (wall_out.b_ant + cav.b_ant) / 2
    b_post_mid = (wall_out.b_post + cav.b_post) / 2
    z_min_rib = _u(rng, -25, 0) * h

    def ribs(x, y, z, half_h=4.5, half_w=3.0):
        b = np.where(y > 0, np.float32(b_mid), np.float32(b_post_mid))
        rho = np.sqrt((x / np.float32(a_mid)) ** 2 + (y / b) ** 2)
        radial = (rho - 1) * np.float32(min(a_mid, b_mid)) / half_w
        sin_t = y / np.maximum(np.sqrt(x * x + y * y), 1e-3)
        zr = z + 75 * sin_t                               # ribs slope down from back to front
        k = np.round((zr - phase) / period)
        vertical = (zr - phase - k * period) / half_h
        front = (sin_t > 0.75) | ((sin_t > 0.3) & (zr < z_min_rib + 40))
        return (radial ** 2 + vertical ** 2 < 1) & ~front & (zr > z_min_rib) & (z < z_top)

    lo = np.array([-wall_out.a, -wall_out.b_post, z_min_rib - 40])
    hi = np.array([wall_out.a, wall_out.b_ant, z_top])
    allowed = (T.MUSCLE, T.SUBCUT_FAT, T.VISCERAL_FAT, T.LUNG)
    return [Paint(Where(lo, hi, ribs), T.CORTICAL_BONE, only=allowed),
            Paint(Where(lo, hi, lambda x, y, z: ribs(x, y, z, 3.2, 1.8)), T.BONE, only=(T.CORTICAL_BONE,))]


def _spine(rng, yV: float, rvx: float, rvy: float, z_bot: float, z_top: float, h: float) -> list:
    """Vertebral bodies with end plates and discs, spinal canal, laminae, spinous and transverse
    processes, repeating every ~30 mm."""
    period = _u(rng, 28, 33) * h
    disc = _u(rng, 6, 9)
    phase0 = _u(rng, 0, period)
    yc = yV - rvy - 9.0

    def ph(z):
        return np.mod(z - phase0, period)

    def ell(x, y, rx, ry, cy):
        return (x / rx) ** 2 + ((y - cy) / ry) ** 2 < 1

    lo, hi = np.array([-60, yV - 70, z_bot]), np.array([60, yV + rvy + 3, z_top])

    def body(x, y, z):
        return ell(x, y, rvx, rvy, yV) & (ph(z) < period - disc)

    def cancellous(x, y, z):
        p = ph(z)
        return ell(x, y, rvx - 2, rvy - 2, yV) & (p > 1.5) & (p < period - disc - 1.5)

    def discs(x, y, z):
        return ell(x, y, rvx, rvy, yV) & (ph(z) >= period - disc)

    def arch(x, y, z):
        p = ph(z)
        r = np.sqrt(x * x + (y - yc) ** 2)
        ring = (r < 13) & (r > 8.5) & (y < yc + 4) & (p < 0.65 * period)
        pedicle = (np.abs(np.abs(x) - 10) < 3) & (y > yc) & (y < yV) & (p < 0.45 * period)
        spinous = (np.abs(x) < 3) & (y < yc - 8) & (y > yc - 36) & (np.abs(p - 0.5 * period) < 0.25 * period)
        transverse = (np.abs(x) < 32) & (np.abs(y - (yc + 4)) < 2.5) & (np.abs(p - 0.35 * period) < 0.08 * period)
        return ring | pedicle | spinous | transverse

    def canal(x, y, z):
        return x * x + (y - yc) ** 2 < 8.5 ** 2

    return [Paint(Where(lo, hi, arch), T.CORTICAL_BONE),
            Paint(Where(lo, hi, body), T.CORTICAL_BONE),
            Paint(Where(lo, hi, cancellous), T.BONE),
            Paint(Where(lo, hi, discs), T.DISC),
            Paint(Where(lo, hi, canal), T.CSF)]
