"""Typed configuration of the Ray side: workers, storage of runs, failure handling (owned by pipeline.launch; the
checks of a whole run against it are in pipeline.launch.checks)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ScalingConfig", "is_node_local", "is_placeholder"]


def is_node_local(path: str) -> bool:
    """A directory on one machine's disk (a plain path or file://), not an object store URL."""
    return "://" not in path or path.startswith("file://")


def is_placeholder(value: str) -> bool:
    """The recipes' "<...>" values that a user must replace before running."""
    return value.startswith("<") and value.endswith(">")


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int | tuple[int, int] = Field(
        1, description="Ray Train workers (one per GPU on a GPU cluster); [min, max] = an elastic worker group: "
        "training goes on with the workers that remain (at least min) when a worker or node is lost, and grows "
        "back (up to max) at a checkpoint when capacity returns")
    resize_interval_s: float = Field(
        60.0, gt=0, description="elastic worker groups: how often Ray looks for capacity to grow (or shrink) the "
        "group; a resize first commits a checkpoint at a common step")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0, description="used only when use_gpu")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra custom resources")
    address: str | None = Field(None, description="Ray cluster address; null = $RAY_ADDRESS or start a local one")
    storage_path: str = Field(
        "./runs", description="where runs and checkpoints go: s3://bucket/runs (every node must reach it), or a "
        "directory for one machine (see shared_filesystem)"
    )
    shared_filesystem: bool = Field(
        False, description="storage_path is a directory every node mounts (NFS, Lustre...): allow a plain path on "
        "a multi-node or GPU cluster"
    )
    max_failures: int = Field(2, ge=-1, description="worker-group restarts; -1 = unlimited")
    num_to_keep: int | None = Field(2, gt=0, description="checkpoints kept; null = all")
    stop_grace_s: int = Field(
        300, gt=0, description="a submitted job that is stopped (vitpipe jobs stop) has this long to finish its "
        "step and commit a checkpoint before Ray kills it"
    )


    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("num_workers must be a positive number, or [min, max] with 1 <= min <= max")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may train on."""
        return range(self.min_workers, self.max_workers + 1)
