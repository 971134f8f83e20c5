"""Whole-volume inference, flip TTA, post-processing, predictions back in the input's geometry, run glue."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dualssl.config import Config
from dualssl.evaluation.inference import FLIP_AXES, Predictor, amp_dtype
from dualssl.evaluation.metrics import case_metrics
from dualssl.evaluation.postprocess import keep_large_components
from dualssl.data.datalist import Case
from dualssl.evaluation.run import evaluate_cases, evaluate_checkpoint, predict_paths


class ThresholdNet(torch.nn.Module):
    """A fixed-function segmenter: pancreas where the windowed intensity exceeds ``threshold``."""

    def __init__(self, threshold: float = 0.6, gain: float = 40.0) -> None:
        super().__init__()
        self.threshold, self.gain = threshold, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = self.gain * (x - self.threshold)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def small_config(**eval_overrides) -> Config:
    cfg = Config()
    cfg.data.patch_size = (16, 16, 16)
    cfg.data.spacing = (1.2, 1.2, 1.6)
    cfg.eval.sw_batch_size = 4
    for key, value in eval_overrides.items():
        setattr(cfg.eval, key, value)
    return cfg.validate()


# Stored orientations with anisotropic voxels: LPS (DICOM-like), LAI (the NIH scan's) and ASL
# (axes permuted: the 2.5 mm axis is the second array axis).
AFFINES = {
    "LPS": np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]]),
    "LAI": np.array([[-0.8, 0, 0, 40.0], [0, 0.8, 0, -10.0], [0, 0, -2.5, 25.0], [0, 0, 0, 1]]),
    "ASL": np.array([[0, 0, -0.8, 12.0], [0.8, 0, 0, -10.0], [0, 2.5, 0, -20.0], [0, 0, 0, 1]]),
}


def write_case(folder: Path, name: str, affine: np.ndarray, centre=(30, 16, 9),
               shape=(48, 40, 16)) -> tuple[Path, Path]:
    """CT-like int16 scan (air, a 0 HU body, a 200 HU off-centre ellipsoid) and the ellipsoid's label."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    spacing = nib.affines.voxel_sizes(affine)
    mm, centre_mm = grid * spacing, np.asarray(centre) * spacing
    body = (((mm - mm.reshape(-1, 3).mean(0)) / np.array([17.0, 14.0, 19.0])) ** 2).sum(-1) <= 1.0
    label = (((mm - centre_mm) / np.array([7.0, 6.0, 8.0])) ** 2).sum(-1) <= 1.0
    ct = np.where(body, 0, -1000).astype(np.int16)
    ct[label] = 200
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}_ct.nii.gz", folder / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), paths[0])
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), paths[1])
    return paths


def test_prediction_runs_in_eval_mode_and_restores_the_models_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Dropout3d(0.5)).train()
    predictor = Predictor(model, small_config(), device="cpu")
    image = torch.rand(1, 20, 20, 20)
    assert torch.equal(predictor.predict_probs(image), predictor.predict_probs(image))  # no dropout
    assert model.training


def test_probs_cover_volumes_smaller_and_larger_than_the_window():
    torch.manual_seed(0)
    predictor = Predictor(torch.nn.Conv3d(1, 3, 3, padding=1), small_config(), device="cpu")
    for shape in [(1, 11, 9, 7), (1, 37, 20, 18)]:
        probs = predictor.predict_probs(torch.rand(shape))
        assert probs.shape == (3, *shape[1:]) and probs.dtype == torch.float32
        assert torch.allclose(probs.sum(0), torch.ones(shape[1:]), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(1,X,Y,Z\)"):
        predictor.predict_probs(torch.rand(20, 20, 20))


def test_flip_tta_is_the_mean_of_all_eight_flipped_predictions():
    assert len(FLIP_AXES) == 8 and len(set(FLIP_AXES)) == 8
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)  # random kernel: not flip-symmetric
    predictor = Predictor(conv, small_config(), device="cpu")
    image = torch.rand(1, 20, 18, 17)
    expected = torch.stack([
        torch.flip(predictor.predict_probs(torch.flip(image, [a - 1 for a in axes]), tta=False),
                   [a - 1 for a in axes]) for axes in FLIP_AXES]).mean(0)
    tta = predictor.predict_probs(image, tta=True)
    assert torch.allclose(tta, expected, atol=1e-5)
    assert (tta - predictor.predict_probs(image, tta=False)).abs().max() > 1e-3


def test_predict_volume_keeps_the_large_components():
    image = torch.zeros(1, 40, 24, 24)
    image[0, 2:14, 4:16, 4:16] = 1.0    # 1728 voxels: the largest
    image[0, 20:31, 4:15, 4:15] = 1.0   # 1331 > half of it: kept
    image[0, 34:39, 4:9, 4:9] = 1.0     # 125: removed
    for keep in (True, False):
        mask = Predictor(ThresholdNet(), small_config(keep_largest=keep), device="cpu").predict_volume(image)
        assert mask.shape == image.shape and mask.dtype == torch.uint8
        assert int(mask[0, :32].sum()) == 1728 + 1331
        assert int(mask[0, 34:].sum()) == (0 if keep else 125)


def test_keep_large_components_connectivity_and_labels():
    mask = np.zeros((1, 12, 12, 12), dtype=np.uint8)
    mask[0, 0:4, 0:4, 0:4] = 2
    mask[0, 4:7, 4:7, 4:7] = 1  # touches the first cube at one corner only
    full = keep_large_components(mask, connectivity=3)
    faces = keep_large_components(torch.from_numpy(mask), connectivity=1)
    assert np.array_equal(full, mask)  # one 26-connected component
    assert isinstance(faces, torch.Tensor) and faces.dtype == torch.uint8
    assert int((faces == 2).sum()) == 64 and int((faces == 1).sum()) == 0  # 27 < 32 = half of 64
    with pytest.raises(ValueError, match="min_fraction"):
        keep_large_components(mask, min_fraction=2.0)


def test_amp_only_on_cuda():
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("off", torch.device("cuda")) is None
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="amp"):
        amp_dtype("half", torch.device("cpu"))


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_predict_file_returns_the_input_geometry(tmp_path, orientation):
    ct_path, label_path = write_case(tmp_path, "case", AFFINES[orientation])
    cfg = small_config()
    predictor = Predictor(ThresholdNet(), cfg, device="cpu")
    # the model really works on another grid: RAS, 1.2 x 1.2 x 1.6 mm, cropped to the body
    work = predictor.preprocess({"image": str(ct_path)})["image"]
    assert work.shape[1:] != nib.load(ct_path).shape

    out = predictor.predict_file(ct_path)
    written = tmp_path / "pred.nii.gz"
    nib.save(out, written)
    back = nib.load(written)
    label = nib.load(label_path)
    assert back.shape == label.shape and np.allclose(back.affine, label.affine)
    assert back.get_data_dtype() == np.uint8
    pred = np.asanyarray(back.dataobj)
    dice = case_metrics(pred, np.asanyarray(label.dataobj), nib.affines.voxel_sizes(label.affine))["dice"]
    assert dice > 0.9
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        predictor.predict_file(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_predict_file_is_exact_when_the_model_works_at_the_input_spacing(tmp_path, orientation):
    # Reorientation and the body crop are exact on the voxel grid: any flip, permutation or
    # half-voxel slip in the way back would change some voxels of the mask.
    ct_path, label_path = write_case(tmp_path, "case", AFFINES[orientation])
    cfg = small_config()
    cfg.data.spacing = (0.8, 0.8, 2.5)  # the input's voxel size, in RAS axis order for all three
    out = Predictor(ThresholdNet(), cfg, device="cpu").predict_file(ct_path)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(label_path).dataobj))


def test_evaluate_cases_writes_per_case_csv_and_summary(tmp_path):
    cases = []
    for i, (site, orientation) in enumerate([("src", "LPS"), ("far", "LAI"), ("far", "LPS")]):
        ct, label = write_case(tmp_path / "data", f"c{i}", AFFINES[orientation], centre=(26 + 2 * i, 16, 8))
        cases.append(Case(case_id=f"c{i}", image=str(ct), label=str(label), site=site))
    cfg = small_config()
    predictor = Predictor(ThresholdNet(), cfg, device="cpu")
    out = tmp_path / "eval"
    summary = evaluate_cases(predictor, cases, cfg, out, source_sites=["src"], save_predictions=True)

    with (out / "per_case.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["c0", "c1", "c2"]
    assert all(float(r["dice"]) > 0.9 and float(r["hd95"]) < 3.0 for r in rows)
    assert all(float(r["label_ml"]) == pytest.approx(4 / 3 * np.pi * 7 * 6 * 8 / 1000, rel=0.15) for r in rows)
    # summary.json is strict JSON: the source site's std of one case (NaN) is null there
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary).replace(": NaN", ": null"))
    assert np.isnan(summary["per_site"]["src"]["dice_std"])
    assert summary["per_site"]["far"]["n"] == 2 and summary["per_site"]["src"]["source"]
    assert summary["across_sites"]["unseen_sites"] == ["far"]
    assert summary["across_sites"]["mean_unseen_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows[1:]]))
    assert [r["role"] for r in rows] == ["source", "unseen", "unseen"]
    assert all(0.9 < float(r["nsd"]) <= 1.0 for r in rows)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]


def test_an_empty_prediction_is_counted_as_missed_not_as_a_distance(tmp_path):
    # Threshold 0.6 finds the 200 HU ellipsoid; threshold 2.0 finds nothing in a [0, 1] image.
    # The old code gave the missed case HD95 = the image diagonal (about 60 mm here), which then
    # dominated the site's hd95_mean.
    ct, label = write_case(tmp_path / "data", "c0", AFFINES["LPS"])
    cases = [Case(case_id="c0", image=str(ct), label=str(label), site="far")]
    cfg = small_config()
    found = evaluate_cases(Predictor(ThresholdNet(0.6), cfg, device="cpu"), cases, cfg, tmp_path / "a", ["src"])
    missed = evaluate_cases(Predictor(ThresholdNet(2.0), cfg, device="cpu"), cases, cfg, tmp_path / "b", ["src"])
    far = missed["per_site"]["far"]
    assert (far["n_missed"], far["dice_mean"], far["nsd_mean"], far["failure_rate"]) == (1, 0.0, 0.0, 1.0)
    assert far["hd95_mean"] is None or np.isnan(far["hd95_mean"])
    with (tmp_path / "b" / "per_case.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert row["hd95"] == "nan" and row["empty_pred"] == "True"
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["per_site"]["far"]["hd95_mean"] is None
    assert found["per_site"]["far"]["n_missed"] == 0 and found["per_site"]["far"]["hd95_mean"] < 3.0


def test_predict_paths_file_and_folder_outputs(tmp_path):
    data = tmp_path / "scans"
    (ct_a, _), (ct_b, _) = (write_case(data, n, AFFINES["LPS"]) for n in ("a", "b"))
    for p in data.glob("*_label.nii.gz"):
        p.unlink()
    cfg = small_config()
    predictor = Predictor(ThresholdNet(), cfg, device="cpu")

    single = predict_paths(predictor, [ct_a], tmp_path / "one" / "mask.nii.gz")
    assert single == [tmp_path / "one" / "mask.nii.gz"]
    assert nib.load(single[0]).shape == nib.load(ct_a).shape

    several = predict_paths(predictor, [data], tmp_path / "many", tta=True)
    assert [p.name for p in several] == [ct_a.name, ct_b.name] and all(p.is_file() for p in several)
    assert np.array_equal(np.asanyarray(nib.load(several[0]).dataobj), np.asanyarray(nib.load(single[0]).dataobj))

    with pytest.raises(ValueError, match="overwrite its input"):
        predict_paths(predictor, [data], data)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict_paths(predictor, [tmp_path / "nowhere"], tmp_path / "x")


def write_msd(root: Path, sites: dict[str, int]) -> Path:
    """A tiny MSD-layout dataset (dataset.json with a site per training entry)."""
    entries = []
    (root / "labelsTr").mkdir(parents=True)
    for site, n in sites.items():
        for i in range(n):
            ct, label = write_case(root / "imagesTr", f"{site}_{i}", AFFINES["LPS"], centre=(26 + 2 * i, 16, 8))
            label = label.rename(root / "labelsTr" / ct.name)
            entries.append({"image": str(ct.relative_to(root)), "label": str(label.relative_to(root)), "site": site})
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": {"0": "background", "1": "pancreas"},
                                                   "training": entries}))
    return root


def test_checkpoint_and_model_folder_glue(tmp_path):
    from dualssl.export import export_model
    from dualssl.models import build_model

    cfg = small_config()
    cfg.model.widths = (8, 8, 8, 8)  # the real network, as small as it gets: this tests the glue
    cfg.data.patch_size = (32, 32, 32)  # one window per tiny volume
    cfg.data.source_sites = ["src"]
    cfg.data.val_fraction = 0.5
    torch.manual_seed(0)
    state = {"config": cfg.to_dict(), "model": build_model(cfg.model).state_dict()}
    ckpt = tmp_path / "checkpoint_best.pt"
    torch.save(state, ckpt)
    root = write_msd(tmp_path / "data", {"src": 2, "far": 1})

    summary = evaluate_checkpoint(ckpt, root, None, tmp_path / "eval", tta=False)
    assert list(summary["per_site"]) == ["far"] and summary["per_site"]["far"]["n"] == 1  # unseen only
    assert summary["settings"]["checkpoint"] == str(ckpt)
    on_source = evaluate_checkpoint(ckpt, root, ["src"], tmp_path / "eval_src", tta=False)
    assert on_source["per_site"]["src"]["n"] == 1 and on_source["across_sites"]["n_sites"] == 0  # val case only
    with pytest.raises(ValueError, match="available"):
        evaluate_checkpoint(ckpt, root, ["mars"], tmp_path / "eval_x", tta=False)

    ct = root / "imagesTr" / "far_0_ct.nii.gz"
    from_ckpt = predict_paths(ckpt, [ct], tmp_path / "a.nii.gz")
    folder = export_model(state, tmp_path / "model", torchscript=False)
    from_folder = predict_paths(folder, [ct], tmp_path / "b.nii.gz")
    a, b = (np.asanyarray(nib.load(p[0]).dataobj) for p in (from_ckpt, from_folder))
    assert a.shape == nib.load(ct).shape and a.dtype == np.uint8 and np.array_equal(a, b)

    torch.save({"model": state["model"]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a dualssl training checkpoint"):
        predict_paths(tmp_path / "bad.pt", [ct], tmp_path / "c.nii.gz")
