"""Report parts that read a peer system's own files: nnU-Net's fitted CT normalisation of a study's cells.

nnU-Net writes its normalisation (``foreground_intensity_properties_per_channel``) into the plans of
each cell's ``nnUNet_preprocessed`` folder (``studies/peer_cell.py``); with the dataset fingerprint of
the study (``fingerprint/fingerprint.json``) it explains an intensity-shift failure
(``dualssl.report.intensity_section``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dualssl.report.document import Section
from dualssl.report.intensity_section import intensity_rows, intensity_section
from studies.peer_cell import peer_work_dir


def nnunet_intensity_properties(work: Path) -> dict[str, float] | None:
    """nnU-Net's foreground intensity properties (channel 0) from a cell's plans, or None if not planned."""
    for plans in sorted((work / "nnUNet_preprocessed").glob("Dataset*/nnUNetPlans*.json")):
        props = json.loads(plans.read_text()).get("foreground_intensity_properties_per_channel", {})
        if "0" in props:
            return {k: float(v) for k, v in props["0"].items()}
    return None


def peer_intensity_sections(train_storage: str, cells: Sequence[Mapping[str, Any]], peer_arms: Sequence[str],
                            fingerprint_json: Path, hu_window: Sequence[float]) -> list[Section]:
    """One intensity section per source site that has a finished nnU-Net cell (its first such cell's plans:
    every cell of one source site fits the same cases, so the same normalisation)."""
    if not fingerprint_json.is_file():
        return []
    fingerprint = json.loads(fingerprint_json.read_text())
    sites = fingerprint.get("sites", {})
    out, seen = [], set()
    for cell in cells:
        source = str(cell.get("source_site", ""))
        if cell.get("arm") not in peer_arms or cell.get("status") != "completed" or source in seen:
            continue
        props = nnunet_intensity_properties(peer_work_dir(train_storage, str(cell["cell"])))
        if props is None or source not in sites:
            continue
        seen.add(source)
        rows = intensity_rows(sites, source, props, hu_window)
        section = intensity_section(rows, props, hu_window, source)
        section.text += f" (nnU-Net plans of cell {cell['cell']}.)"
        out.append(section)
    return out
