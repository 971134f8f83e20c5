"""Procedural multi-site abdominal CT phantom with pancreas labels, written in the MSD layout.

* :func:`generate_dataset` writes ``imagesTr``, ``labelsTr`` and ``dataset.json`` (a ``site`` per case).
* :func:`render_case` renders one case in memory (image, label, affine, dtype, organ map, info).
* :data:`SITE_PROFILES` holds the seven scanner/protocol profiles as data (see docs/PHANTOM.md).
* :func:`sweep_profiles` / :func:`generate_sweep_dataset`: severity sweeps, one knob of a base site
  set per value (:data:`SWEEP_AXES`: noise, HU offset and scale, slice, phase, cupping, truncation, pixel).
* :class:`PhantomOptions` / :data:`PHANTOM_PRESETS`: what a case shows besides its site (coverage, field
  of view and table, the pancreas' surroundings and fat); ``options=`` of :func:`generate_dataset`/:func:`render_case`.
* :class:`ShapeBank`: real pancreas masks (``shape_bank=`` of :func:`generate_dataset`/:func:`render_case`)
  painted, deformed, where the procedural pancreas sits.
"""

from dualssl.data.phantom.generate import case_id, case_seed, generate_dataset, generate_sweep_dataset, nifti_bytes
from dualssl.data.phantom.measure import core_mask, core_medians
from dualssl.data.phantom.options import PRESETS as PHANTOM_PRESETS
from dualssl.data.phantom.options import PhantomOptions, phantom_options
from dualssl.data.phantom.render import PhantomCase, render_case
from dualssl.data.phantom.shape_bank import ShapeBank
from dualssl.data.phantom.sites import SITE_PROFILES, SiteProfile, get_profile
from dualssl.data.phantom.sweeps import AXES as SWEEP_AXES
from dualssl.data.phantom.sweeps import sweep_name, sweep_profile, sweep_profiles
from dualssl.data.phantom.tissues import Tissue

__all__ = ["PHANTOM_PRESETS", "PhantomCase", "PhantomOptions", "SITE_PROFILES", "SWEEP_AXES", "ShapeBank",
           "SiteProfile", "Tissue", "case_id", "case_seed", "core_mask", "core_medians", "generate_dataset",
           "generate_sweep_dataset", "get_profile", "nifti_bytes", "phantom_options", "render_case", "sweep_name",
           "sweep_profile", "sweep_profiles"]
