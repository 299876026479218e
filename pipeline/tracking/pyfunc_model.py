"""The MLflow pyfunc model of a registered checkpoint, logged "from code": MLflow stores this file itself (no
cloudpickle of any object) next to the checkpoint's `model.safetensors` + `model.json` artifacts, and
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` or `mlflow models serve` runs it.

Input: uint8 images [N, H, W, C] (the signature's dtype; MLflow enforces it), at the model's resolution.
Output: float32 logits [N, num_classes], or features [N, embed_dim] for a headless model. The normalisation the
model was trained with (`model_config["normalize"]`) is applied here, the way the training loop applies it.

The library never imports this module (the registry passes MLflow its path); MLflow executes it, which is why
mlflow is imported at the top here and `set_model` runs at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import normalize
from pipeline.model.checkpoint import load_model

__all__ = ["ViTClassifier"]


class ViTClassifier(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint artifacts with the project's own loader (safetensors; nothing unpickled)."""

    def load_context(self, context: Any) -> None:
        self.model = load_model(Path(context.artifacts["weights"]).parent).eval()
        self.augment = AugmentConfig(normalize=(context.model_config or {}).get("normalize", "imagenet"))

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        images = torch.tensor(np.asarray(model_input))  # a copy: normalisation works in place
        size = self.model.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[1:3]) != (size, size):
            raise ValueError(f"expected images [N, {size}, {size}, C], got shape {tuple(images.shape)}")
        x = normalize(images.permute(0, 3, 1, 2).contiguous(), self.augment)
        with torch.inference_mode():
            return self.model(x).float().numpy()


mlflow.models.set_model(ViTClassifier())
