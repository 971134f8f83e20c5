"""Make docs/phantom_sites.png: one patient (one seed) through the seven site profiles.

Each panel is the axial slice with the largest pancreas area, shown as stored (so calibration
offsets stay visible) in one window, radiological convention (patient's right on the left),
with the pancreas label outlined. With ``--real``, an eighth panel shows the NIH Pancreas-CT
scan at its pancreas for comparison.

    python benchmarks/plot_phantom_sites.py --out docs/phantom_sites.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from dualssl.data.phantom import SITE_PROFILES, render_case  # noqa: E402

WINDOW = (-160, 240)
VIEW_MM = 380.0


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def _panel(ax, image: np.ndarray, label: np.ndarray, pixel_mm: float, title: str) -> None:
    """``image``, ``label``: one RAS axial slice (X, Y); drawn anterior up, patient's right left."""
    view = np.flipud(np.fliplr(image.T)).astype(float)
    mask = np.flipud(np.fliplr(label.T)).astype(float)
    h, w = view.shape
    ax.imshow(view, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=(0, w * pixel_mm, h * pixel_mm, 0),
              interpolation="bilinear")
    if mask.any():
        xs, ys = (np.arange(w) + 0.5) * pixel_mm, (np.arange(h) + 0.5) * pixel_mm
        ax.contour(xs, ys, mask, [0.5], colors="#ff7f0e", linewidths=0.9)
    cx, cy = w * pixel_mm / 2, h * pixel_mm / 2
    ax.set_xlim(cx - VIEW_MM / 2, cx + VIEW_MM / 2)
    ax.set_ylim(cy + VIEW_MM * 0.36, cy - VIEW_MM * 0.36)
    ax.set_facecolor("black")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_sites.png"))
    parser.add_argument("--seed", type=int, default=3, help="one patient: the same seed at every site")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--real", type=Path, default=None,
                        help="shared data folder; adds the NIH Pancreas-CT slice as a reference panel")
    args = parser.parse_args(argv)

    fig, axes = plt.subplots(2, 4, figsize=(10.4, 5.6))
    for ax, (name, profile) in zip(axes.flat, SITE_PROFILES.items()):
        case = render_case(name, args.seed, args.scale)
        image, label = _canonical(case.image, case.affine), _canonical(case.label, case.affine)
        z = int(np.argmax(label.sum(axis=(0, 1))))
        sp = case.info["spacing_mm"]
        title = (f"{name}: {profile.phase}, {profile.orientation} {profile.dtype}\n"
                 f"{case.info['clinical_pixel_mm']:.2f}x{case.info['clinical_slice_mm']:g} mm "
                 f"(stored {sp[0]:.2f}x{sp[2]:.1f}), noise {case.info['noise_hu']:.0f} HU {profile.noise_kind}")
        _panel(ax, image[:, :, z], label[:, :, z], sp[0], title)
    last = axes.flat[-1]
    nih = args.real / "real" / "nih_pancreas_ct_0001" if args.real else None
    if nih is not None and (nih / "ct.nii.gz").is_file():
        ct, lab = nib.load(nih / "ct.nii.gz"), nib.load(nih / "pancreas.nii.gz")
        image, label = _canonical(np.asarray(ct.dataobj), ct.affine), _canonical(np.asarray(lab.dataobj), lab.affine)
        z = int(np.argmax(label.sum(axis=(0, 1))))
        _panel(last, image[:, :, z], label[:, :, z], float(ct.header.get_zooms()[0]),
               "real: NIH Pancreas-CT PANCREAS_0001\n(Roth et al., TCIA 2016, CC BY)")
    else:
        last.axis("off")
    fig.suptitle(f"dualssl phantom: one patient (seed {args.seed}) at seven sites, scale {args.scale:g}; "
                 f"window [{WINDOW[0]}, {WINDOW[1]}] of the stored values; pancreas outlined", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
