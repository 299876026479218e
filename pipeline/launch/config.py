"""Typed configuration of the Ray side: workers, storage of runs, failure handling (owned by pipeline.launch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.data.config import resolve_readers
from pipeline.data.epochs import check_world_size, servable_world_sizes

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = ["ScalingConfig", "is_node_local", "is_placeholder", "check_storage", "check_world_sizes",
           "SHARED_STORAGE_HINT"]


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


SHARED_STORAGE_HINT = ("set scaling.storage_path to object storage every node reaches (e.g. --set "
                       "scaling.storage_path=s3://BUCKET/runs), or scaling.shared_filesystem=true if it is a "
                       "directory every node mounts (NFS, Lustre)")


def check_storage(cfg: "RunConfig") -> None:
    """Static checks of where the run goes (no I/O): scaling.storage_path is not a recipe's placeholder, nor a
    node-local directory for a GPU run unless declared shared; GPU decoding only on GPU workers."""
    from pipeline.errors import ConfigError

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


def check_world_sizes(cfg: "RunConfig") -> None:
    """Every world size the run may train on (scaling.num_workers, each of min..max when elastic) serves the
    training plan: data.virtual_readers and train.global_batch / micro_batch split evenly over the workers."""
    from pipeline.errors import ConfigError

    tr, sc = cfg.train, cfg.scaling
    readers = resolve_readers(cfg.data, tr.global_batch)
    works = servable_world_sizes(readers, tr.global_batch, tr.micro_batch)
    bad = [w for w in sc.world_sizes if w not in works]
    if not bad:
        return
    if not sc.elastic:
        try:
            check_world_size(bad[0], readers, tr.global_batch, tr.micro_batch)
        except ValueError as e:
            raise ConfigError(f"scaling.num_workers={bad[0]}: {e}") from None
    raise ConfigError(
        f"scaling.num_workers={list(sc.num_workers)}: the group may train on any of {sc.min_workers}..."
        f"{sc.max_workers} workers, but {', '.join(map(str, bad))} cannot serve the training plan (data."
        f"virtual_readers {readers}, train.global_batch {tr.global_batch}, train.micro_batch {tr.micro_batch}): "
        f"world sizes that work: {', '.join(map(str, works))}; choose a range of those, or make data.virtual_readers "
        "and train.global_batch / train.micro_batch multiples of every size in the range")
