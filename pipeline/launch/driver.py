"""Training on a Ray cluster: `fit(cfg, run=...)` checks the cluster, wires Ray Train (TorchTrainer, storage,
failures, checkpoints) around the worker (pipeline.launch.worker), and consolidates the final model into
`<run_url>/final`. It returns its result and makes no MLflow calls: the job's driver owns the tracked run
(pipeline.tracking.run) and passes its `RunRef` down. ray is imported inside functions.

Everything a worker needs crosses to it inside its `WorkerSpec` (pickled by Ray) or as a URL under
`scaling.storage_path`: never as a path on the driver's disk.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec

from pipeline.config import RunConfig
from pipeline.data.config import resolve_readers
from pipeline.data.epochs import ReaderPlan
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.storage import Storage
from pipeline.errors import ConfigError
from pipeline.launch.checks import SHARED_STORAGE_HINT, check_storage, check_world_sizes
from pipeline.launch.config import is_node_local
from pipeline.launch.elastic import CommitRequest, resize_gate
from pipeline.launch.fanout import connect_ray
from pipeline.launch.stop import StopSignal, on_sigterm, torch_config
from pipeline.launch.worker import EVALUATION_FILE, eval_worker, train_worker
from pipeline.tracking.sinks import RunRef
from pipeline.train.hooks import TrainHooks
from pipeline.train.runstore import RunStore
from pipeline.train.spec import FewshotEval, FinalEval, InitSpec, WorkerSpec

__all__ = [
    "FitResult", "cluster_nodes", "run_url", "run_store", "ray_storage", "preflight",
    "check_cluster", "worker_env", "build_trainer", "fit", "finish_fit", "evaluate",
]

log = logging.getLogger(__name__)

# Environment the workers need that a remote cluster's nodes may not have; never credentials (those come from
# the nodes' own environment / instance roles, or the job's runtime env). DS_ACCELERATOR only on CPU clusters.
_FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TORCH_EXTENSIONS_DIR", "MLFLOW_DISABLE_TELEMETRY")
_CPU_ONLY_ENV = ("DS_ACCELERATOR",)


@dataclass
class FitResult:
    name: str
    run_url: str                       # <storage>/<name>: the run's folder with its training checkpoints
    step: int                          # the last step trained
    checkpoint: str | None             # the latest committed training checkpoint (ZeRO shards)
    final_checkpoint: str | None       # <run_url>/final: model.safetensors + model.json (None when stopped)
    stopped: bool = False              # a stop request ended training early, after a committed checkpoint
    reason: str | None = None          # what asked for the stop
    metrics: dict[str, Any] = field(default_factory=dict)  # the last step's reported metrics


def cluster_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def run_url(cfg: RunConfig) -> str:
    """`<scaling.storage_path>/<name>`: the run's folder in storage (Ray's layout)."""
    base = cfg.scaling.storage_path
    if "://" not in base:
        base = os.path.abspath(base)
    return base.rstrip("/") + "/" + cfg.name


def run_store(cfg: RunConfig) -> RunStore:
    """The run's folder in storage: its checkpoints, its final model (pipeline.train.runstore)."""
    return RunStore(run_url(cfg), Storage(cfg.storage))


def ray_storage(storage_path: str, storage: Storage) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: object stores go through an fsspec filesystem
    wrapped for pyarrow (path without the scheme); local directories are made absolute."""
    if is_node_local(storage_path):
        return os.path.abspath(storage_path.removeprefix("file://")), None

    protocol, path = storage_path.split("://", 1)
    if protocol in ("s3", "s3a"):
        # A plain s3fs instance, not pipeline.data.storage's cached one: Ray pickles this filesystem into its
        # controller and workers, and fsspec filesystems pickle as their constructor arguments.
        config = storage.config
        client_kwargs = {"region_name": config.region} if config.region else {}
        fs = fsspec.filesystem(
            "s3", anon=config.anon, endpoint_url=config.endpoint_url or None, profile=config.profile,
            client_kwargs=client_kwargs, skip_instance_cache=True,
            config_kwargs={"retries": {"mode": "standard", "max_attempts": config.max_retries + 1}},
        )
    else:
        fs = fsspec.filesystem(protocol)
    import pyarrow.fs  # Ray's storage filesystem only: local runs (and gpu_check's machine) need no pyarrow

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def check_cluster(cfg: RunConfig, nodes: int | None = None) -> None:
    """The connected cluster can run `cfg`: a node-local storage_path only on a single-node cluster (or declared
    shared). `nodes`: alive nodes (default: asked from Ray)."""
    sc = cfg.scaling
    if not is_node_local(sc.storage_path) or sc.shared_filesystem:
        return
    nodes = cluster_nodes() if nodes is None else nodes
    if nodes > 1:
        raise ConfigError(f"scaling.storage_path {sc.storage_path!r} is a directory on the driver's machine, but "
                          f"the Ray cluster has {nodes} nodes that do not share it: {SHARED_STORAGE_HINT}")


def preflight(cfg: RunConfig) -> None:
    """Cheap checks before any cluster work: the world sizes the plan must serve, storage, datasets readable and
    consistent with the model."""
    check_world_sizes(cfg)
    check_storage(cfg)
    storage = Storage(cfg.storage)
    train = load_dataset_spec(cfg.data.train, storage)
    if train.num_classes and cfg.model.num_classes and train.num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"data.train ({cfg.data.train}) has {train.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={train.num_classes}"
        )
    try:  # the plan over this dataset: one global batch per epoch at least

        ReaderPlan(train.samples_per_shard, resolve_readers(cfg.data, cfg.train.global_batch), cfg.train.global_batch)
    except ValueError as e:
        raise ConfigError(f"data.train ({cfg.data.train}): {e}") from None
    if cfg.data.val:
        load_dataset_spec(cfg.data.val, storage)
    if cfg.data.fewshot_train and cfg.train.fewshot_every:
        for url in (cfg.data.fewshot_train, cfg.data.fewshot_test):
            if url and load_dataset_spec(url, storage).label_type != "single":
                raise ConfigError(f"few-shot set {url} is multi-label; few-shot evaluation needs single labels")


def worker_env(cfg: RunConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables the workers get from the driver's environment."""
    environ = os.environ if environ is None else environ
    names = _FORWARD_ENV if cfg.scaling.use_gpu else _FORWARD_ENV + _CPU_ONLY_ENV
    return {k: environ[k] for k in names if k in environ}


def build_trainer(cfg: RunConfig, train_fn: Callable[[], None]):
    """The Ray TorchTrainer for `cfg` (scaling, storage, failure and checkpoint policy from the typed config):
    NCCL on GPUs, gloo on CPUs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    store = run_store(cfg)
    storage_path, storage_fs = ray_storage(sc.storage_path, store.storage)
    env = worker_env(cfg)
    elastic = {"elastic_resize_monitor_interval_s": sc.resize_interval_s} if sc.elastic else {}
    callbacks = [resize_gate(CommitRequest(store.url, store.storage), sc.stop_grace_s, sc.resize_interval_s)] \
        if sc.elastic else None
    return TorchTrainer(
        train_fn,
        torch_config=torch_config("nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources, **elastic,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=sc.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=callbacks,
        ),
    )


def fit(cfg: RunConfig, *, run: RunRef | None = None, init: InitSpec | None = None, hooks: TrainHooks | None = None,
        final_eval: FinalEval | None = None, address: str | None = None) -> FitResult:
    """Trains `cfg` on the Ray cluster (`address` / scaling.address / $RAY_ADDRESS, else a local Ray) and
    exports the final model. Rank 0 logs metrics to `run`; with `final_eval` the workers evaluate data.val once
    training ends (its metrics are in the result). A run folder that holds committed checkpoints is continued from
    the newest one. A SIGTERM to this process or to a worker ends training early after a committed checkpoint
    (`FitResult.stopped`); nothing is exported then."""
    connect_ray(address or cfg.scaling.address)
    check_cluster(cfg)
    url = run_url(cfg)
    spec = WorkerSpec(config=cfg, run_url=url, run=run or RunRef(), init=init, hooks=hooks or TrainHooks(),
                      final_eval=final_eval)
    storage = Storage(cfg.storage)
    stop = StopSignal.create(url, storage)
    CommitRequest(url, storage).clear()  # a request an earlier attempt left behind is not this group's
    trainer = build_trainer(cfg, functools.partial(train_worker, spec, stop))
    with on_sigterm(stop):
        result = trainer.fit()
    return finish_fit(cfg, url, dict(result.metrics or {}), stop.reason or "SIGTERM on a worker")


def finish_fit(cfg: RunConfig, url: str, metrics: dict[str, Any], stop_reason: str) -> FitResult:
    """The FitResult of a run whose ranks returned `metrics`, and its final export when training completed."""
    # the committed checkpoints in storage are the authority (as for restores): a run resumed after it had
    # finished training (its export was interrupted, say) reports nothing new, and its last checkpoint is final
    store = RunStore(url, Storage(cfg.storage))
    latest = store.latest_state()
    step = int(latest[1]["step"]) if latest else 0
    out = FitResult(cfg.name, url, step, latest[0] if latest else None, None, metrics=metrics)
    if metrics.get("stopped"):
        out.stopped, out.reason = True, stop_reason
        return out
    if step != cfg.train.steps:
        raise RuntimeError(f"run {cfg.name!r}: training ended at step {step} of {cfg.train.steps} without a final "
                           f"checkpoint (aborted?)")
    out.final_checkpoint = store.export_final(out.checkpoint, extra={"name": cfg.name})
    return out


def evaluate(cfg: RunConfig, *, init: InitSpec, final_eval: FinalEval | None = None,
             fewshot: FewshotEval | None = None, run: RunRef | None = None, address: str | None = None
             ) -> dict[str, float]:
    """An evaluation-only job on the Ray cluster: the workers load `init` and evaluate it on their devices, each
    rank on its share of the splits (`final_eval`: top-1 etc. on data.val; `fewshot`: the closed-form few-shot
    accuracies); rank 0 logs to `run`. Returns rank 0's metrics. No checkpoints are written."""
    connect_ray(address or cfg.scaling.address)
    check_cluster(cfg)
    spec = WorkerSpec(config=cfg, run_url=run_url(cfg), run=run or RunRef(), init=init, final_eval=final_eval,
                      fewshot_eval=fewshot, evaluate_only=True)
    build_trainer(cfg, functools.partial(eval_worker, spec)).fit()
    store = spec.store
    store.storage.forget(store.url)
    metrics = json.loads(store.storage.read_bytes(f"{store.url}/{EVALUATION_FILE}"))
    return {k: v for k, v in metrics.items() if k.startswith(("final/", "fewshot/", "probe/"))}
