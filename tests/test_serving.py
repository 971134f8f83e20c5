"""The registered model is the pipeline: the MLflow pyfunc and `mlflow models serve` equal `dualssl predict`.

A tiny seeded network (untrained: its mask is noisy, so any difference in preprocessing, blending, TTA,
post-processing or the way back onto the input grid changes voxels) is exported, logged to a real
sqlite MLflow store and registered with the alias champion. The slow tests start the real
``mlflow models serve`` process on 127.0.0.1 and send it the scan's NIfTI bytes over HTTP.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from dualssl.config import Config
from dualssl.engine.checkpoint import save_checkpoint
from dualssl.export import export_model, input_example, log_model
from dualssl.models import build_model

REPO = Path(__file__).resolve().parents[1]
NAME = "dualssl-serving-test"
NIH_SCAN = Path("real") / "nih_pancreas_ct_0001" / "ct.nii.gz"


def tiny_config() -> Config:
    cfg = Config()
    cfg.with_overrides({"model.widths": (8, 8, 16, 16), "data.patch_size": (32, 32, 16),
                        "data.spacing": (3.0, 3.0, 4.0), "eval.sw_batch_size": 2})
    return cfg.validate()


def tiny_model_folder(tmp: Path) -> Path:
    cfg = tiny_config()
    torch.manual_seed(0)
    net = build_model(cfg.model)
    state = {"format": "dualssl-checkpoint/1", "config": cfg.to_dict(), "model": net.state_dict(),
             "epoch": 1, "best_metric": 0.5, "best_epoch": 1}
    return export_model(save_checkpoint(tmp / "checkpoint.pt", state), tmp / "model", torchscript=False)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """``(tracking URI, model folder)``: the tiny model registered as ``NAME@champion`` in a sqlite store."""
    import mlflow

    tmp = tmp_path_factory.mktemp("serving")
    folder = tiny_model_folder(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("serving", str(tmp / "artifacts")))
        with mlflow.start_run():
            logged = log_model(folder, registered_name=NAME, tags={"study": "serving-test"})
        assert logged["registered_uri"] == f"models:/{NAME}@champion"
    finally:
        mlflow.set_tracking_uri("")
    return uri, folder


def dualssl_predict(uri: str, scan: Path, out: Path) -> nib.Nifti1Image:
    """``dualssl predict --model models:/NAME@champion`` as a user runs it (a fresh process)."""
    done = subprocess.run([sys.executable, "-m", "dualssl.cli", "predict", "--model", f"models:/{NAME}@champion",
                           "--tracking-uri", uri, str(scan), "-o", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=out.parent,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return nib.load(out)


def test_pyfunc_takes_bytes_paths_and_arrays_and_unpickles_nothing(registered, tmp_path):
    import mlflow

    from dualssl import serving
    from dualssl.evaluation.run import predict_paths

    uri, folder = registered
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "dl")))
        files = {str(f.relative_to(local)) for f in local.rglob("*") if f.is_file()}
        pickled = [f for f in files if f.endswith((".pkl", ".pth", ".pickle", ".cloudpickle")) or f.startswith("data/")]
        assert not pickled, f"pickled objects in the registered model: {pickled}"
        assert {"serving.py", "code/dualssl/serving.py", "code/dualssl/evaluation/inference.py",
                "input_example.json", "serving_input_example.json"} <= files
        info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
        assert [c.name for c in info.signature.inputs.inputs] == ["nifti", "path", "image", "affine"]
        assert info.signature.params.to_dict()[0]["name"] == "probabilities"
        version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
        assert version.tags["study"] == "serving-test"
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        mlflow.set_tracking_uri("")

    # the logged input example: a small synthetic scan as base64 .nii.gz
    example = input_example(tiny_config())
    scan = serving.decode_nifti(example["nifti"])
    scan_path = tmp_path / "scan.nii.gz"
    nib.save(scan, scan_path)
    (expected_path,) = predict_paths(str(folder), [scan_path], tmp_path / "expected.nii.gz")
    expected = np.asanyarray(nib.load(expected_path).dataobj)
    assert 0 < expected.sum() < expected.size  # a noisy mask: any difference in the pipeline shows

    (by_bytes,) = model.predict(example, params={"probabilities": True})
    (by_path,) = model.predict({"path": str(scan_path)})
    (by_array,) = model.predict([{"image": np.asanyarray(scan.dataobj), "affine": scan.affine}])
    for out in (by_bytes, by_path, by_array):
        mask = serving.decode_nifti(out["mask"])
        assert np.array_equal(np.asanyarray(mask.dataobj), expected)
        assert np.allclose(mask.affine, scan.affine) and np.allclose(out["affine"], scan.affine)
        assert out["shape"] == list(scan.shape) and out["foreground_voxels"] == int(expected.sum())
    probs = np.asanyarray(serving.decode_nifti(by_bytes["probabilities"]).dataobj)
    assert probs.shape == scan.shape and probs.dtype == np.float32 and 0 <= probs.min() and probs.max() <= 1
    assert "probabilities" not in by_path
    # the mask is the argmax (before the largest-component step) of these probabilities where it is 1
    assert np.all(probs[expected == 1] >= 0.5 - 1e-4)
    with pytest.raises(Exception, match="exactly one of"):
        model.predict({"nifti": example["nifti"], "path": str(scan_path)})


# --- slow: the real `mlflow models serve` process, a real HTTP request ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` on a free loopback port."""
    uri, _ = registered
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    log = open(log_path, "w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-t", "1800"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail(f"mlflow models serve did not answer /ping: {log_path.read_text()[-3000:]}")
        yield {"url": f"http://127.0.0.1:{port}", "pid": proc.pid, "uri": uri}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()


def post_scan(url: str, scan: Path) -> dict:
    """The scan's NIfTI bytes as base64 in MLflow's JSON body -> the first prediction."""
    body = json.dumps({"dataframe_records": [{"nifti": base64.b64encode(scan.read_bytes()).decode("ascii")}]})
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.loads(response.read())["predictions"][0]


def served_and_predicted(server: dict, scan: Path, tmp_path: Path) -> tuple[dict, Any, Any, Any]:
    """(the served answer, its decoded mask, ``dualssl predict``'s mask, the scan), for one scan."""
    from dualssl.serving import decode_nifti

    out = post_scan(server["url"], scan)
    expected = dualssl_predict(server["uri"], scan, tmp_path / "predicted.nii.gz")
    return out, decode_nifti(out["mask"]), expected, nib.load(scan)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_served_model_answers_http_with_the_mask_of_dualssl_predict_on_a_phantom_scan(server, phantom_root, tmp_path):
    scan = sorted((phantom_root / "imagesTr").glob("*.nii.gz"))[0]
    out, mask, expected, original = served_and_predicted(server, scan, tmp_path)
    assert mask.shape == original.shape[:3] and np.allclose(mask.affine, original.affine, atol=1e-5)
    assert np.allclose(np.asarray(out["affine"]), original.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(mask.dataobj), np.asanyarray(expected.dataobj))
    assert np.asanyarray(mask.dataobj).any()  # not trivially equal


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.timeout(3600)
def test_served_model_answers_http_with_the_mask_of_dualssl_predict_on_the_nih_scan(server, shared_data, tmp_path):
    scan = shared_data / NIH_SCAN
    if not scan.is_file():
        pytest.skip(f"{scan} is absent")
    out, mask, expected, original = served_and_predicted(server, scan, tmp_path)
    assert mask.shape == original.shape[:3] and np.allclose(mask.affine, original.affine, atol=1e-5)
    assert np.allclose(np.asarray(out["affine"]), original.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(mask.dataobj), np.asanyarray(expected.dataobj))
    assert np.asanyarray(mask.dataobj).any()  # not trivially equal
