"""Static checks of a run against where and on how many workers it will train: no I/O, run by preflight and by
`vitpipe submit` before anything starts; each refusal names the field and what to set."""

from __future__ import annotations

from pipeline.config import RunConfig
from pipeline.data.config import resolve_readers
from pipeline.data.epochs import check_world_size, servable_world_sizes
from pipeline.errors import ConfigError
from pipeline.launch.config import is_node_local, is_placeholder

__all__ = ["check_storage", "check_world_sizes", "SHARED_STORAGE_HINT"]


SHARED_STORAGE_HINT = ("set scaling.storage_path to object storage every node reaches (e.g. --set "
                       "scaling.storage_path=s3://BUCKET/runs), or scaling.shared_filesystem=true if it is a "
                       "directory every node mounts (NFS, Lustre)")


def check_storage(cfg: RunConfig) -> None:
    """Static checks of where the run goes (no I/O): scaling.storage_path is not a recipe's placeholder, nor a
    node-local directory for a GPU run unless declared shared; GPU decoding only on GPU workers."""
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


def check_world_sizes(cfg: RunConfig) -> None:
    """Every world size the run may train on (scaling.num_workers, each of min..max when elastic) serves the
    training plan: data.virtual_readers and train.global_batch / micro_batch split evenly over the workers."""
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
