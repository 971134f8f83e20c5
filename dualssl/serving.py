"""The MLflow pyfunc of a dualssl model folder, logged as *models from code* (no pickle).

``dualssl.export.log_model`` passes this file as ``python_model`` to ``mlflow.pyfunc.log_model``:
MLflow copies the file into the model (``serving.py`` beside ``MLmodel``) and runs it at load time, so nothing
is unpickled. The weights come from the folder's ``model.safetensors`` (tensors only), loaded into
the TorchScript graph ``model.ts``; this file imports torch, MONAI, safetensors and PyYAML, not
dualssl, so the registered model serves wherever its pinned requirements are installed.

    model = mlflow.pyfunc.load_model("models:/dualssl-pancreas@champion")
    logits = model.predict(image)   # float32 (B, 1, X, Y, Z), preprocessed -> (B, K, X, Y, Z)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np

ARTIFACT = "model_folder"
"""Name of the model folder in the pyfunc's ``artifacts`` (``artifacts/model_folder/`` in the model)."""


class DualSSLPyfunc(mlflow.pyfunc.PythonModel):
    """Sliding-window logits of a preprocessed volume, with the window settings of ``config.yaml``."""

    def load_context(self, context: Any) -> None:
        import torch
        import yaml
        from safetensors.torch import load_file

        folder = Path(context.artifacts[ARTIFACT])
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        self.roi_size = tuple(int(s) for s in cfg["data"]["patch_size"])
        self.sw_batch_size = int(cfg["eval"]["sw_batch_size"])
        self.overlap = float(cfg["eval"]["sw_overlap"])
        self.net = torch.jit.load(str(folder / "model.ts"), map_location="cpu").eval()
        # safetensors is the source of truth: the TorchScript only carries the graph
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))

    # model_input stays unannotated: MLflow would read a type hint as a per-row input schema
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        """``model_input``: float32 ``(B, 1, X, Y, Z)`` (or ``{"image": ...}``) -> logits ``(B, K, X, Y, Z)``."""
        import torch
        from monai.inferers import sliding_window_inference

        image = model_input["image"] if isinstance(model_input, dict) else model_input
        x = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if x.ndim != 5:
            raise ValueError(f"dualssl model: input of shape {tuple(x.shape)}; give a float32 array "
                             "(B, 1, X, Y, Z) of HU-windowed [0, 1] intensities at the model's spacing")
        with torch.no_grad():
            logits = sliding_window_inference(x, roi_size=self.roi_size, sw_batch_size=self.sw_batch_size,
                                              predictor=self.net, overlap=self.overlap, mode="gaussian")
        return logits.numpy()


mlflow.models.set_model(DualSSLPyfunc())
