"""The data pass's fingerprint in the study report (Markdown and HTML: a section of the report document
with the per-site table and the embedded figure) and in the MLflow parent run (JSON, CSV, figure and
plan as artifacts of a real local store)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import pytest

from dualssl.data.datalist import load_datalist
from dualssl.data.fingerprint import fingerprint_cases, site_differences, summarise_sites
from dualssl.data.fingerprint_io import FIGURE_NAME, write_fingerprint
from dualssl.report import write_report
from studies.preprocess import DataPass, fingerprint_sections, log_to_parent
from tests.test_report_failed_cells import _rows


@pytest.fixture(scope="module")
def data_pass(phantom_root, tmp_path_factory) -> DataPass:
    cases = load_datalist(phantom_root)
    picked = [c for site in sorted({c.site for c in cases}) for c in [c for c in cases if c.site == site][:2]]
    rows = fingerprint_cases(picked, workers=1)
    summary = summarise_sites(rows)
    differences = site_differences(summary, "pv_standard")
    folder = tmp_path_factory.mktemp("study") / "fingerprint"
    write_fingerprint(folder, rows, summary, differences, "pv_standard")
    plan = {"reasons": ["spacing 1.5 x 1.5 x 2.0 mm: the median (test)"], "source_sites": ["pv_standard"],
            "spacing": [1.5, 1.5, 2.0], "hu_window": [-100.0, 240.0], "patch_size": [48, 48, 32],
            "memory_gb": 8.0, "estimated_gb": 1.0}
    (folder / "plan.json").write_text(json.dumps(plan))
    return DataPass(cases=len(picked), written=len(picked), plan=plan, fingerprint_dir=str(folder),
                    differences=differences)


def test_report_md_and_html_hold_the_site_table_and_the_figure(data_pass, tmp_path):
    out = tmp_path / "report"
    paths = write_report(_rows(), out, "Fingerprinted", n_boot=200,
                         extra_sections=fingerprint_sections(data_pass, out))
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "## Dataset fingerprint" in md and f"]({FIGURE_NAME})" in md and (out / FIGURE_NAME).is_file()
    table = md.split("## Dataset fingerprint")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["cone_beam", "native_thick", "pv_standard"]
    # the native_thick row names what differs from the source (the phantom writes it as int32, RAS)
    native = next(r for r in rows if "native_thick" in r)
    assert "dtype int32 vs int16" in native and "slice thickness" in native
    assert "(source site)" in next(r for r in rows if "pv_standard" in r)
    assert "Planned with --plan auto: spacing 1.5 x 1.5 x 2.0 mm" in md
    # the HTML report: the same section, table and the figure embedded (the very PNG)
    section = page.split("<h2>Dataset fingerprint</h2>")[1].split("</section>")[0]
    assert "<table>" in section and "native_thick" in section and "dtype int32 vs int16" in section
    png = base64.b64encode((out / FIGURE_NAME).read_bytes()).decode("ascii")
    assert f"data:image/png;base64,{png}" in section


def test_no_fingerprint_no_section(tmp_path):
    assert fingerprint_sections(DataPass(), tmp_path) == []


def test_parent_run_holds_the_fingerprint_files_and_the_plan(data_pass, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a real local store (MLflow 3 refuses new file stores)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("fp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    log_to_parent(uri, parent, data_pass)
    names = {a.path for a in client.list_artifacts(parent, "fingerprint")}
    assert names == {f"fingerprint/{n}" for n in ("fingerprint.json", "fingerprint.csv", FIGURE_NAME, "plan.json")}
    local = client.download_artifacts(parent, f"fingerprint/{FIGURE_NAME}", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == (Path(data_pass.fingerprint_dir) / FIGURE_NAME).read_bytes()
    params = client.get_run(parent).data.params
    assert params["preprocess.cases"] == str(data_pass.cases)
    assert params["plan.spacing"] == "1.5,1.5,2" and params["plan.patch_size"] == "48,48,32"
    # a resumed study logs again: the first values stay, nothing fails
    log_to_parent(uri, parent, data_pass)
