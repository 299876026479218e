"""The pretraining driver: checks the config, wires Ray Train (TorchTrainer, storage, failures, checkpoints) around
the self-contained worker `pipeline.train.loop.train_worker`, then exports the final model. The driver does no
training itself; ray and mlflow are imported inside functions."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipeline.data.config import StorageConfig

__all__ = [
    "PretrainResult",
    "connect_ray",
    "run_url",
    "ray_storage",
    "preflight",
    "worker_config",
    "build_trainer",
    "run_pretraining",
]

log = logging.getLogger(__name__)

# Environment the workers need that a remote cluster's nodes may not have; never credentials (those come from
# the nodes' own environment / instance roles).
_FORWARD_ENV = (
    "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "MLFLOW_TRACKING_URI",
    "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_S3_ENDPOINT_URL",
)


@dataclass
class PretrainResult:
    name: str
    run_url: str                       # <storage>/<name>: Ray's run folder with the training checkpoints
    checkpoint: str | None             # the latest training checkpoint (ZeRO shards)
    final_checkpoint: str | None       # <storage>/<name>/final: model.safetensors + model.json
    run_id: str | None                 # MLflow run
    metrics: dict[str, Any] = field(default_factory=dict)
    registered: Any = None             # pipeline.tracking.registry.RegisteredVersion, when registered


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connects to `address` / $RAY_ADDRESS, or starts a local single-node Ray bound to 127.0.0.1."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray picks the eth0 address for its services and MASTER_ADDR unless told it runs a local-only node; its
        # child processes read the variable at start, this process's Ray read it at import (maybe already done).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def run_url(cfg: Any) -> str:
    """`<scaling.storage_path>/<name>`: the run's folder in storage (Ray's layout)."""
    base = cfg.scaling.storage_path
    if "://" not in base:
        base = os.path.abspath(base)
    return base.rstrip("/") + "/" + cfg.name


def ray_storage(storage_path: str, storage: StorageConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: object stores go through an fsspec filesystem
    wrapped for pyarrow (path without the scheme); local directories are made absolute."""
    if "://" not in storage_path or storage_path.startswith("file://"):
        return os.path.abspath(storage_path.removeprefix("file://")), None
    import fsspec
    import pyarrow.fs

    protocol, path = storage_path.split("://", 1)
    if protocol in ("s3", "s3a"):
        # A plain s3fs instance, not pipeline.data.storage's cached one: Ray pickles this filesystem into its
        # controller and workers, and fsspec filesystems pickle as their constructor arguments.
        client_kwargs = {"region_name": storage.region} if storage.region else {}
        fs = fsspec.filesystem(
            "s3", anon=storage.anon, endpoint_url=storage.endpoint_url or None, profile=storage.profile,
            client_kwargs=client_kwargs, skip_instance_cache=True,
            config_kwargs={"retries": {"mode": "standard", "max_attempts": storage.max_retries + 1}},
        )
    else:
        fs = fsspec.filesystem(protocol)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def preflight(cfg: Any) -> None:
    """Cheap checks before any cluster work: batch arithmetic, datasets readable and consistent with the model."""
    from pipeline.config import ConfigError
    from pipeline.train.engine import gradient_accumulation

    try:
        gradient_accumulation(cfg.train, cfg.scaling.num_workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        from pipeline.data.manifest import load_dataset_spec
    except ImportError:  # the data package is optional at this layer; the workers will fail clearly instead
        return
    train = load_dataset_spec(cfg.data.train, cfg.storage)
    if train.num_classes and cfg.model.num_classes and train.num_classes > cfg.model.num_classes:
        raise ConfigError(
            f"data.train ({cfg.data.train}) has {train.num_classes} classes but model.num_classes is "
            f"{cfg.model.num_classes}; set model.num_classes={train.num_classes}"
        )
    if cfg.data.val:
        load_dataset_spec(cfg.data.val, cfg.storage)
    if cfg.data.fewshot_train and cfg.train.fewshot_every:
        for url in (cfg.data.fewshot_train, cfg.data.fewshot_test):
            if url and load_dataset_spec(url, cfg.storage).label_type != "single":
                raise ConfigError(f"few-shot set {url} is multi-label; few-shot evaluation needs single labels")


def worker_config(cfg: Any, *, run_id: str | None = None, init: Mapping[str, Any] | None = None,
                  eval_hooks: list[Callable | str] | None = None, fault: Mapping[str, Any] | None = None,
                  config_class: str | None = None) -> dict[str, Any]:
    """The plain dict `train_worker` receives (see pipeline.train.loop's docstring)."""
    if config_class is None:
        config_class = f"{type(cfg).__module__}:{type(cfg).__qualname__}"
    if init is not None:
        unknown = set(init) - {"checkpoint", "reset_head", "freeze_backbone"}
        if unknown:
            raise ValueError(f"init spec: unknown keys {sorted(unknown)}; allowed: checkpoint, reset_head, "
                             "freeze_backbone")
    return {
        "config": cfg.model_dump(mode="json"), "config_class": config_class, "run_id": run_id,
        "init": dict(init) if init else None, "eval_hooks": list(eval_hooks or []),
        "fault": dict(fault) if fault else None, "run_url": run_url(cfg),
    }


def build_trainer(cfg: Any, train_config: dict[str, Any], train_fn: Callable | None = None):
    """The Ray TorchTrainer for `cfg` (scaling, storage, failure and checkpoint policy from the typed config)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_worker

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    storage_path, storage_fs = ray_storage(sc.storage_path, cfg.storage)
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    return TorchTrainer(
        train_fn or train_worker,
        train_loop_config=train_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=sc.num_to_keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def _run_exists(url: str, storage: StorageConfig) -> bool:
    from pipeline.data.storage import get_filesystem

    fs, path = get_filesystem(url, storage)
    try:
        return bool(fs.exists(path) and fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def _resume_run_id(url: str, storage: StorageConfig) -> str | None:
    import json

    from pipeline.data.storage import get_filesystem
    from pipeline.train.checkpoint import find_latest_complete

    latest = find_latest_complete(url, storage)
    if latest is None:
        return None
    fs, path = get_filesystem(latest, storage)
    return json.loads(fs.cat_file(f"{path}/train_state.rank0.json")).get("run_id")


def run_pretraining(cfg: Any, *, resume: bool = False, address: str | None = None,
                    init: Mapping[str, Any] | None = None, eval_hooks: list[Callable | str] | None = None,
                    fault: Mapping[str, Any] | None = None) -> PretrainResult:
    """Runs (or with `resume`, continues) a pretraining run on Ray and exports the final model.

    A run is identified by `<scaling.storage_path>/<name>`. Without `resume`, an existing run there is an
    error (so a typo cannot silently continue someone's run); with it, Ray restores the run's latest committed
    checkpoint and the workers continue the same MLflow run. `init`/`eval_hooks` are passed to the worker (see
    pipeline.train.loop); `fault` is a TEST-ONLY failure injection (default: $VITPIPE_TEST_FAULT as JSON)."""
    from pipeline.config import ConfigError
    from pipeline.tracking.sinks import create_run, end_run, resolve_tracking_uri

    if fault is None and os.environ.get("VITPIPE_TEST_FAULT"):
        # TEST ONLY: the same injection for runs started as cluster jobs (the variable reaches their driver)
        import json

        fault = json.loads(os.environ["VITPIPE_TEST_FAULT"])
    preflight(cfg)
    url = run_url(cfg)
    exists = _run_exists(url, cfg.storage)
    if exists and not resume:
        raise ConfigError(
            f"run {cfg.name!r} already exists at {url}; pass --resume to continue it, or choose another name "
            f"(--set name=...)"
        )
    if resume and not exists:
        log.warning("--resume: no run at %s yet; starting it", url)
    if cfg.tracking.sink == "mlflow" and not cfg.tracking.tracking_uri:
        # make the URI explicit (and absolute for sqlite) so workers in other directories log to the same place
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"tracking_uri": resolve_tracking_uri(cfg.tracking)})})
    run_id = None
    if cfg.tracking.sink == "mlflow":
        run_id = _resume_run_id(url, cfg.storage) if resume else None
        if run_id is None:
            from pipeline.config import config_hash

            run_id = create_run(cfg.tracking, cfg.name, {"vitpipe.run_url": url, "config_hash": config_hash(cfg)})
        log.info("MLflow run %s (%s)", run_id, cfg.tracking.tracking_uri)

    connect_ray(address or cfg.scaling.address)
    trainer = build_trainer(cfg, worker_config(cfg, run_id=run_id, init=init, eval_hooks=eval_hooks, fault=fault))
    try:
        result = trainer.fit()
    except BaseException:
        if run_id:
            end_run(cfg.tracking, run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    run_id = metrics.get("run_id") or run_id
    out = PretrainResult(cfg.name, url, None, None, run_id or None, metrics)
    if result.checkpoint is None:
        log.warning("run %s reported no checkpoint; nothing to export", cfg.name)
        return out
    out.checkpoint = _checkpoint_url(cfg, result.checkpoint.path)
    _export(cfg, result.checkpoint, out)
    if run_id:
        end_run(cfg.tracking, run_id, "FINISHED")
    return out


def _checkpoint_url(cfg: Any, path: str) -> str:
    base = cfg.scaling.storage_path
    if "://" in base and not base.startswith("file://"):
        return f"{base.split('://', 1)[0]}://{path}"
    return path


def _export(cfg: Any, checkpoint: Any, out: PretrainResult) -> None:
    """Consolidates the final ZeRO checkpoint into `<run>/final`, logs it to the MLflow run, registers it."""
    from pipeline.tracking.sinks import build_sink
    from pipeline.train.checkpoint import export_final, read_train_state, upload_dir

    final_url = out.run_url + "/final"
    with checkpoint.as_directory() as local, tempfile.TemporaryDirectory(prefix="vitpipe-final-") as tmp:
        state = read_train_state(local, 0)
        export_final(local, state.get("model") or cfg.model.model_dump(mode="json"), tmp,
                     extra={"name": cfg.name, "run_url": out.run_url})
        upload_dir(tmp, final_url, cfg.storage)
        out.final_checkpoint = final_url
        log.info("final model (step %s) saved to %s", state["step"], final_url)
        sink = build_sink(cfg.tracking, 0, run_id=out.run_id, run_name=cfg.name)
        # --- model registry: the single call site (pipeline.tracking.registry, owned by the transfer area) ---
        # A registered model's files are logged once, by the registry, under the run's `final/` artifacts.
        if cfg.tracking.registered_model:
            from pipeline.data.manifest import load_dataset_spec
            from pipeline.tracking.registry import lineage_tags, register_checkpoint

            out.registered = register_checkpoint(
                tmp, name=cfg.tracking.registered_model, run_id=out.run_id,
                tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                alias=cfg.tracking.register_alias, artifact_path="final",
                tags=lineage_tags(cfg, run_id=out.run_id, step=int(state["step"]),
                                  images_seen=int(state["step"]) * cfg.train.global_batch,
                                  dataset=load_dataset_spec(cfg.data.train, cfg.storage)),
            )
        else:
            sink.log_artifact(tmp, "final")
        sink.log_metrics({"final/step": float(state["step"])}, int(state["step"]))
        sink.close()
