"""Typed configuration of the Ray side: workers, storage of runs, failure handling (owned by pipeline.launch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = ["ScalingConfig", "is_node_local", "is_placeholder", "check_storage", "SHARED_STORAGE_HINT"]


def is_node_local(path: str) -> bool:
    """A directory on one machine's disk (a plain path or file://), not an object store URL."""
    return "://" not in path or path.startswith("file://")


def is_placeholder(value: str) -> bool:
    """The recipes' "<...>" values that a user must replace before running."""
    return value.startswith("<") and value.endswith(">")


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a GPU cluster)")
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


SHARED_STORAGE_HINT = ("set scaling.storage_path to object storage every node reaches (e.g. --set "
                       "scaling.storage_path=s3://BUCKET/runs), or scaling.shared_filesystem=true if it is a "
                       "directory every node mounts (NFS, Lustre)")


def check_storage(cfg: "RunConfig") -> None:
    """Static checks of where the run goes (no I/O): scaling.storage_path is not a recipe's placeholder, nor a
    node-local directory for a GPU run unless declared shared; GPU decoding only on GPU workers."""
    from pipeline.config import ConfigError

    sc = cfg.scaling
    if is_placeholder(sc.storage_path):
        raise ConfigError(f"scaling.storage_path is the recipe's placeholder {sc.storage_path!r}: set it to where "
                          "this run's checkpoints go, e.g. --set scaling.storage_path=s3://BUCKET/runs")
    if sc.use_gpu and is_node_local(sc.storage_path) and not sc.shared_filesystem:
        raise ConfigError(f"scaling.storage_path {sc.storage_path!r} is a directory on one machine, but "
                          f"scaling.use_gpu runs workers on GPU nodes that do not share it: {SHARED_STORAGE_HINT}")
    if cfg.data.decode_device == "cuda" and not sc.use_gpu:
        raise ConfigError("data.decode_device is 'cuda' but scaling.use_gpu is false: the workers have no GPU to "
                          "decode on (set scaling.use_gpu=true, or data.decode_device=cpu)")
