"""Every figure says what it measured: sim_to_real.py's ``--reference`` is scored on the very scan it
trained on, and its output, the README and docs/PHANTOM.md say so wherever its numbers appear."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sim_to_real():
    spec = importlib.util.spec_from_file_location("sim_to_real", REPO / "benchmarks" / "sim_to_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_output_names_the_scan_it_was_scored_on():
    s2r = _sim_to_real()
    scores = {"nih": {"dice": 0.71, "hd95_mm": 6.5}, "totalseg_agreement": {"dice_vs_totalsegmentator_prediction": 0.1}}
    record = s2r.reference_record({"steps": 400, "best_val_dice": 0.73}, scores)
    assert "nih" not in record  # never read as the NIH score of a net that did not see the scan
    assert record["nih_training_scan"] == {"dice": 0.71, "hd95_mm": 6.5} and record["steps"] == 400
    assert "the very scan it trained on" in record["scored_on"] and "not what it reaches" in record["scored_on"]
    assert scores["nih"]["dice"] == 0.71  # the caller's dict is left as it was


def test_docs_label_every_reference_figure_as_scored_on_its_training_scan():
    readme = (REPO / "README.md").read_text().replace("\n", " ")
    at = readme.index("that scan itself")
    assert "very scan they trained on" in readme[at: at + 120], readme[at - 80: at + 120]
    phantom = (REPO / "docs" / "PHANTOM.md").read_text()
    rows = [ln for ln in phantom.splitlines() if ln.startswith("| reference")]
    assert rows, "docs/PHANTOM.md: no reference rows"
    for row in rows:
        assert "scored on the scan it trained on" in row, row
    section = phantom[phantom.index("## Sim-to-real transfer"):]
    assert "budget's reach" not in section and "reference sets the reach" not in section
