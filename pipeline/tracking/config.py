"""Typed configuration of tracking (the run's sink, MLflow experiment, model registry)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["TrackingConfig", "resolve_tracking_uri"]


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sink: Literal["mlflow", "stdout", "null"] = "mlflow"
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; null = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
    )
    experiment: str = "vit-pretrain"
    run_name: str | None = None
    parent_run_id: str | None = Field(
        None, description="create the run nested under this MLflow run (tag mlflow.parentRunId); set by "
        "`vitpipe transfer-suite` for its tasks"
    )
    artifact_root: str | None = Field(
        None, description="a new experiment stores its artifacts under <artifact_root>/<experiment>; null = the "
        "tracking server's default"
    )
    registered_model: str | None = Field(None, description="register the final checkpoint under this name")
    register_alias: str | None = Field("latest", description="alias set on the newly registered version")
    flush_every_s: float = Field(5.0, gt=0, description="how often the async sink ships batched metrics")

    @field_validator("sink", mode="before")
    @classmethod
    def _yaml_null_is_the_null_sink(cls, value):
        # `sink: null` in YAML (or --set tracking.sink=null) parses as None: the user means the null sink
        return "null" if value is None else value

    @model_validator(mode="after")
    def _registry_needs_mlflow(self) -> "TrackingConfig":
        if self.registered_model and self.sink != "mlflow":
            raise ValueError(
                f"registered_model {self.registered_model!r} needs the MLflow run to register from: set "
                f"tracking.sink=mlflow (got {self.sink!r}) or tracking.registered_model=null"
            )
        return self


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db made absolute (so that processes in other
    directories reach the same store)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
