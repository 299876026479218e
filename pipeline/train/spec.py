"""What a training worker is given: one validated object that Ray pickles whole into every worker process. Ids and
URLs flow down in it; the worker's results come back as its return value and Ray reports, nothing else."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import RunConfig
from pipeline.tracking.run import RunRef
from pipeline.train.hooks import TrainHooks

__all__ = ["InitSpec", "WorkerSpec"]


class InitSpec(BaseModel):
    """Start from these weights instead of a fresh initialisation (transfer jobs). The checkpoint is in the model
    format (model.safetensors + model.json) at a URL every worker can read, already adapted to `config.model`
    (pipeline.model.weights.adapt_state_dict: new head, resampled position embedding)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str = Field(..., description="URL (s3://..., gs://...) or shared path of the initial weights")
    freeze_backbone: bool = Field(False, description="train only head.* (linear probe)")


class WorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    config: RunConfig
    run_url: str = Field(..., description="<scaling.storage_path>/<name>: where the run's checkpoints live")
    run: RunRef = Field(default_factory=RunRef, description="the tracked run rank 0 logs metrics to")
    init: InitSpec | None = None
    hooks: TrainHooks = Field(default_factory=TrainHooks)
