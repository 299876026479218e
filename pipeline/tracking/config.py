"""Typed configuration of tracking (metrics sink, MLflow experiment, model registry)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrackingConfig"]


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sink: Literal["mlflow", "stdout", "null"] = "mlflow"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    experiment: str = "vit-pretrain"
    run_name: str | None = None
    registered_model: str | None = Field(None, description="register the final checkpoint under this name")
    register_alias: str | None = Field("latest", description="alias set on the newly registered version")
    flush_every_s: float = Field(5.0, gt=0, description="how often the async sink ships batched metrics")
