"""pipeline.model: the single-device Vision Transformer, its variant registry, FLOP/parameter accounting,
foreign-weight converters and our checkpoint format. Never imports deepspeed, ray or mlflow.

torch is imported lazily (PEP 562) so that `pipeline.config`, which needs only ModelConfig, stays light."""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.model.config import ModelConfig
from pipeline.model.variants import VARIANTS, Variant, get_variant

__all__ = [
    "ModelConfig", "VisionTransformer", "build_model", "resample_pos_embed", "VARIANTS", "Variant", "get_variant",
]

_LAZY = {
    "VisionTransformer": "pipeline.model.vit",
    "build_model": "pipeline.model.vit",
    "resample_pos_embed": "pipeline.model.posembed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
