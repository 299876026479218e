"""Typed configuration of the Ray side: workers, storage of runs, failure handling (owned by pipeline.launch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ScalingConfig"]


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a GPU cluster)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used only when use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    address: str | None = Field(None, description="Ray cluster address; null = $RAY_ADDRESS or start a local one")
    storage_path: str = Field("./runs", description="where runs and checkpoints go: s3://bucket/runs or a directory")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 = unlimited")
    num_to_keep: int | None = Field(2, gt=0, description="checkpoints kept; null = all")
