"""The MLflow pyfunc of a dualssl model folder: a scan in, its mask (and probabilities) out.

``dualssl.export.log_model`` logs this file as *models from code* (MLflow copies it beside ``MLmodel``
and runs it at load time: nothing is unpickled), the model folder as its artifact and the
``dualssl`` package as its code (``code/dualssl``), so the registered model runs the very code of
``dualssl predict``: the preprocessing spec of the folder's ``config.yaml``
(``dualssl.data.transforms.inference_transforms``), the same ``Predictor`` (softmax-blended sliding
window, the folder's ``eval.tta_flips`` and ``eval.keep_largest``) and the same way back onto the
input's grid (``Predictor.segment_file``).

Input: one row per scan (a pandas DataFrame, a list of dicts or one dict), each with ONE of

    nifti    base64 of the bytes of a .nii or .nii.gz file (what an HTTP client sends)
    path     a NIfTI file on the machine that runs the model
    image    a 3D array of the scan's intensities (HU), with ``affine`` its 4x4 voxel-to-world matrix
             (RAS+, as nibabel's)

Params: ``probabilities`` (bool, default false): also return the foreground probability.
Output: one dict per row: ``mask`` (base64 of a .nii.gz: uint8 labels, 0 background, 1 pancreas, in
the input's shape and affine), ``affine`` (4x4 list), ``shape``, ``foreground_voxels``, and with
``probabilities`` ``probabilities`` (base64 .nii.gz, float32 in [0, 1], same grid). Clients decode a
returned NIfTI with :func:`decode_nifti`.

    model = mlflow.pyfunc.load_model("models:/dualssl-pancreas@champion")
    out = model.predict({"nifti": encode_nifti(Path("scan.nii.gz"))})[0]
    mask = decode_nifti(out["mask"])      # nibabel image on the scan's grid

    mlflow models serve -m models:/dualssl-pancreas@champion --env-manager local -p 5001
    curl -d '{"dataframe_records": [{"nifti": "<base64>"}]}' -H 'Content-Type: application/json' \\
        127.0.0.1:5001/invocations
"""

from __future__ import annotations

import base64
import gzip
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from dualssl.evaluation.model_folder import ARTIFACT  # noqa: F401  (re-exported for dualssl.export)

INPUT_COLUMNS = ("nifti", "path", "image", "affine")
_GZIP_MAGIC = b"\x1f\x8b"


def encode_nifti(source: Any) -> str:
    """Base64 text of a NIfTI: a path (its bytes as they are) or a nibabel image (as .nii.gz)."""
    if isinstance(source, (str, Path)):
        return base64.b64encode(Path(source).read_bytes()).decode("ascii")
    return base64.b64encode(gzip.compress(source.to_bytes(), compresslevel=1)).decode("ascii")


def decode_nifti(text: str):
    """A nibabel image from base64 of .nii or .nii.gz bytes (as :func:`encode_nifti` and the model return)."""
    import nibabel as nib

    raw = base64.b64decode(text)
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    return nib.Nifti1Image.from_bytes(raw)


def input_rows(model_input: Any) -> list[dict[str, Any]]:
    """The rows of any accepted input form, each a dict holding one way of giving a scan."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # pandas DataFrame
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        rows = [dict(model_input)]
    elif isinstance(model_input, (list, tuple)) and all(isinstance(r, Mapping) for r in model_input):
        rows = [dict(r) for r in model_input]
    else:
        raise ValueError(f"dualssl model: input of type {type(model_input).__name__}; give rows with one of "
                         "'nifti' (base64 of .nii/.nii.gz bytes), 'path' or 'image' + 'affine'")

    def given(value: Any) -> bool:
        return value is not None and not (isinstance(value, float) and np.isnan(value))

    out = []
    for i, row in enumerate(rows):
        row = {k: v for k, v in row.items() if k in INPUT_COLUMNS and given(v)}
        ways = [k for k in ("nifti", "path", "image") if k in row]
        if len(ways) != 1 or ("image" in row) != ("affine" in row):
            raise ValueError(f"dualssl model: row {i} gives {sorted(row) or 'nothing'}; give exactly one of "
                             "'nifti' (base64 of .nii/.nii.gz bytes), 'path', or 'image' with 'affine'")
        out.append(row)
    return out


def _scan_file(row: dict[str, Any], folder: Path) -> Path:
    """The row's scan as a NIfTI file (written into ``folder`` unless it is a path)."""
    import nibabel as nib

    if "path" in row:
        return Path(row["path"])
    if "nifti" in row:
        try:
            raw = base64.b64decode(row["nifti"], validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"dualssl model: 'nifti' is not base64 text ({exc})") from exc
        path = folder / ("scan.nii.gz" if raw[:2] == _GZIP_MAGIC else "scan.nii")
        path.write_bytes(raw)
        return path
    image = np.asarray(row["image"])
    affine = np.asarray(row["affine"], dtype=np.float64)
    if image.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"dualssl model: 'image' must be a 3D array and 'affine' 4x4, got {image.shape} "
                         f"and {affine.shape}")
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


def segment_row(predictor, row: dict[str, Any], probabilities: bool = False) -> dict[str, Any]:
    """One scan through ``predictor.segment_file`` (what ``dualssl predict`` runs) -> the output dict."""
    with tempfile.TemporaryDirectory(prefix="dualssl-serve-") as tmp:
        mask, probs = predictor.segment_file(_scan_file(row, Path(tmp)), probabilities=probabilities)
    data = np.asanyarray(mask.dataobj)
    out = {"mask": encode_nifti(mask), "affine": np.asarray(mask.affine).tolist(), "shape": list(data.shape),
           "foreground_voxels": int(np.count_nonzero(data))}
    if probs is not None:
        out["probabilities"] = encode_nifti(probs)
    return out


def model_signature():
    """Input columns ``nifti``/``path`` (string) and ``image``/``affine`` (arrays), all optional (one way per
    row); param ``probabilities``; output ``mask``, ``affine``, ``shape``, ``foreground_voxels``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.string, "nifti", required=False),
                     ColSpec(DataType.string, "path", required=False),
                     ColSpec(AnyType(), "image", required=False), ColSpec(AnyType(), "affine", required=False)])
    outputs = Schema([ColSpec(DataType.string, "mask"), ColSpec(AnyType(), "affine"), ColSpec(AnyType(), "shape"),
                      ColSpec(DataType.long, "foreground_voxels"),
                      ColSpec(DataType.string, "probabilities", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("probabilities", DataType.boolean, False)]))


class DualSSLPyfunc(mlflow.pyfunc.PythonModel):
    """``dualssl predict`` as an MLflow model: the folder's network, config and ``Predictor``."""

    def load_context(self, context: Any) -> None:
        from dualssl.evaluation.inference import Predictor
        from dualssl.evaluation.model_folder import load_folder

        model, cfg = load_folder(context.artifacts[ARTIFACT])
        self.predictor = Predictor(model, cfg)

    # model_input stays unannotated: MLflow would read a type hint as a per-row input schema
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of scans (see the module docstring) -> one output dict per row."""
        probabilities = bool((params or {}).get("probabilities", False))
        return [segment_row(self.predictor, row, probabilities) for row in input_rows(model_input)]


mlflow.models.set_model(DualSSLPyfunc())
