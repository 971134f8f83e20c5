"""The in-plane noise power spectrum (``measure.noise_power_spectrum``) against spectra known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dualssl.data.phantom.measure import noise_power_spectrum

SPACING = (0.8, 0.8, 2.0)


def _uniform(rng: np.random.Generator, sd: float, shape=(192, 192, 12), level: float = 100.0) -> np.ndarray:
    return level + sd * rng.standard_normal(shape).astype(np.float32)


def test_white_noise_has_a_flat_spectrum_at_its_variance_times_the_pixel_area():
    # sd 10 HU at 0.8 mm: NPS = 100 * 0.8 * 0.8 = 64 HU^2 mm^2 at every frequency, sd back as 10 HU.
    out = noise_power_spectrum(_uniform(np.random.default_rng(0), 10.0), SPACING, hu_window=(20.0, 180.0),
                               keep=1.0, slice_step=1)
    nps = np.asarray(out["nps"])
    assert np.all(np.abs(nps[1:] - 64.0) < 0.08 * 64.0), nps   # bin 0 holds the few low frequencies the trend removes
    assert out["noise_sd"] == pytest.approx(10.0 * np.sqrt(1 - 6 / 30 ** 2), rel=0.02)
    # radial centroid of a flat spectrum over the square [-1/(2dx), 1/(2dx)]^2: 0.3826 / dx (numerically)
    u = np.fft.fftfreq(30, 0.8)
    r = np.hypot(u[:, None], u[None, :])
    assert out["mean_freq_per_mm"] == pytest.approx(float(r.mean()), rel=0.03)
    assert out["tiles"] == 6 * 6 * 12


def test_blurred_noise_moves_power_to_low_frequencies_as_a_gaussian_filter_predicts():
    rng = np.random.default_rng(1)
    white = rng.standard_normal((192, 192, 12)).astype(np.float32)
    sigma_px = 1.5
    blurred = 100.0 + 10.0 * ndimage.gaussian_filter(white, (sigma_px, sigma_px, 0))
    # Squares of 96 px: the quadratic trend takes 6 of about 96^2 / (4 pi 1.5^2) = 326 independent
    # samples of this correlated noise, so the variance stays within 2 % of the filter's.
    out = noise_power_spectrum(blurred, SPACING, roi_mm=76.8, hu_window=(20.0, 180.0), keep=1.0, slice_step=1)
    # variance of unit white noise after a 2D Gaussian of sigma s pixels: 1 / (4 pi s^2)
    assert out["noise_sd"] == pytest.approx(10.0 / np.sqrt(4 * np.pi * sigma_px ** 2), rel=0.04)
    # transfer |H(f)|^2 = exp(-(2 pi f sigma)^2) with sigma in mm: the ratio of two bins says so
    f, nps = np.asarray(out["freq_per_mm"]), np.asarray(out["nps"])
    s_mm = sigma_px * SPACING[0]
    expected = np.exp(-(2 * np.pi * s_mm) ** 2 * (f[4] ** 2 - f[2] ** 2))
    assert nps[4] / nps[2] == pytest.approx(expected, rel=0.15)
    white_out = noise_power_spectrum(100.0 + 10.0 * white, SPACING, roi_mm=76.8, hu_window=(20.0, 180.0), keep=1.0,
                                     slice_step=1)
    assert out["mean_freq_per_mm"] < 0.6 * white_out["mean_freq_per_mm"]


def test_squares_with_an_edge_or_outside_the_window_are_left_out():
    rng = np.random.default_rng(2)
    hu = _uniform(rng, 5.0)
    hu[96:, :, :] = -100.0 + 5.0 * rng.standard_normal((96, 192, 12))   # fat: outside the window
    hu[:96, 100:, :] += 60.0                                              # a step edge inside the window
    out = noise_power_spectrum(hu, SPACING, hu_window=(20.0, 250.0), keep=0.5, slice_step=1)
    # Kept: the uniform squares only (the step runs through the squares of one column): sd stays 5.
    assert out["noise_sd"] == pytest.approx(5.0, rel=0.05)


def test_too_few_squares_and_too_small_squares_are_named():
    hu = _uniform(np.random.default_rng(3), 5.0, shape=(40, 40, 2))
    with pytest.raises(ValueError, match="squares of 24.0 mm"):
        noise_power_spectrum(hu, SPACING)
    with pytest.raises(ValueError, match="roi_mm"):
        noise_power_spectrum(hu, SPACING, roi_mm=3.0)


@pytest.mark.realdata
def test_the_nih_scan_reads_the_noise_its_site_is_known_for(shared_data):
    # shared/data/README: 10-12 HU of noise on the NIH Pancreas-CT scans (soft kernel, portal phase).
    import nibabel as nib

    img = nib.load(shared_data / "real" / "nih_pancreas_ct_0001" / "ct.nii.gz")
    out = noise_power_spectrum(np.asarray(img.dataobj, np.float32), img.header.get_zooms()[:3])
    assert out["tiles"] >= 30
    assert 9.0 <= out["noise_sd"] <= 14.0, out["noise_sd"]
    # a soft kernel: power falls towards the Nyquist frequency
    assert out["nps"][-1] < 0.5 * max(out["nps"])
