"""The pretraining job (what `vitpipe pretrain` and the Ray job `python -m jobs.pretrain` run): every check that can
fail before a worker starts, then

    with TrackedRun.open(cfg.tracking, cfg.name) as run:      # the run's only owner
        result = fit(cfg, run=run.ref)                        # Ray Train + DeepSpeed workers
        run.register(<final model>, ...)                      # with its lineage

A run lives at `<scaling.storage_path>/<name>`; `resume` continues its newest committed checkpoint in the same
MLflow run (the checkpoint records the run's id and its resolved config).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig, config_hash
from pipeline.data.manifest import load_dataset_spec
from pipeline.errors import ConfigError, RunStopped
from pipeline.launch.driver import check_cluster, fit, preflight, run_store
from pipeline.launch.fanout import connect_ray
from pipeline.lineage import lineage_tags
from pipeline.tracking.run import TrackedRun, flatten_params
from pipeline.train.engine import deepspeed_config
from pipeline.train.hooks import TrainHooks
from pipeline.version import code_version

__all__ = ["PretrainResult", "run_pretraining", "resume_changes", "RESUMABLE_CHANGES", "ARCHITECTURE",
           "SAMPLE_ORDER"]

log = logging.getLogger(__name__)

# Fields a resume may change without changing the experiment (logged at INFO); any other change is logged as a
# warning; a change of the architecture is refused (the checkpoint's weights and optimizer state would not fit).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.eval_every",
                     "train.eval_batches", "train.fewshot_every", "scaling.", "storage.", "tracking.",
                     "data.num_workers", "data.prefetch_factor")
ARCHITECTURE = ("model.name", "model.image_size", "model.in_chans", "model.num_classes", "model.classifier",
                "model.pre_logits")
# Fields that fix the order of the samples (pipeline.data.epochs.ReaderPlan): a resume that changes one is refused.
SAMPLE_ORDER = ("data.virtual_readers", "train.global_batch", "data.seed")


@dataclass
class PretrainResult:
    name: str
    run_url: str                       # <storage>/<name>: the run's folder with the training checkpoints
    checkpoint: str | None             # the latest training checkpoint (ZeRO shards)
    final_checkpoint: str | None       # <storage>/<name>/final: model.safetensors + model.json
    run_id: str | None                 # MLflow run
    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    registered: Any = None             # pipeline.tracking.registry.RegisteredVersion, when registered
    experiment_id: str | None = None   # MLflow experiment of the run


def resume_changes(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted field, value in the checkpoint, value now) for every field a resume changes."""
    old, new = flatten_params(saved), flatten_params(cfg.model_dump(mode="json"))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _check_resume(saved: dict[str, Any] | None, cfg: RunConfig, checkpoint: str) -> None:
    if saved is None:  # a checkpoint from before the resolved config was recorded
        return
    changes = resume_changes(saved, cfg)
    arch = [c for c in changes if c[0] in ARCHITECTURE]
    if arch:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in arch)
        raise ConfigError(f"--resume: checkpoint {checkpoint} holds another model ({listed}); set the same values "
                          "or start a new run (--set name=...)")
    if saved.get("data", {}).get("virtual_readers") is None:  # written before the elastic plan
        log.warning("--resume: checkpoint %s predates the elastic data plan: it continues at its step with %d virtual "
                    "readers; the samples of its epoch in progress are not exactly the ones it would have read",
                    checkpoint, cfg.data.virtual_readers)
        changes = [c for c in changes if c[0] != "data.virtual_readers"]
    else:
        order = [c for c in changes if c[0] in SAMPLE_ORDER]
        if order:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in order)
            raise ConfigError(f"--resume: checkpoint {checkpoint} was trained with another order of the samples "
                              f"({listed}); set the same values to continue it exactly, or start a new run "
                              "(--set name=...)")
    other = [c for c in changes if not c[0].startswith(RESUMABLE_CHANGES)]
    for k, a, b in changes:
        log.log(logging.WARNING if (k, a, b) in other else logging.INFO, "--resume: %s changed %r -> %r", k, a, b)


def run_pretraining(cfg: RunConfig, *, resume: bool = False, address: str | None = None,
                    hooks: TrainHooks | None = None) -> PretrainResult:
    """Runs (or with `resume`, continues) a pretraining run and registers its final model. Bad input raises
    ConfigError before the tracked run or any worker exists; a stop (SIGTERM, `vitpipe jobs stop`) raises
    RunStopped after a committed checkpoint, the run ending KILLED. `hooks`: see pipeline.train.hooks."""
    preflight(cfg)
    connect_ray(address or cfg.scaling.address)
    check_cluster(cfg)
    store = run_store(cfg)
    url = store.url
    previous = store.latest_state() if resume else None
    if previous is not None:
        _check_resume(previous[1].get("config"), cfg, previous[0])
    elif store.exists():
        if not resume:
            raise ConfigError(f"run {cfg.name!r} already exists at {url}; pass --resume to continue it, or choose "
                              "another name (--set name=...)")
        log.warning("--resume: %s holds no committed checkpoint; starting the run from step 0", url)
    elif resume:
        log.warning("--resume: no run at %s yet; starting it", url)
    resume_id = previous[1].get("run_id") if previous else None
    tags = {"vitpipe.run_url": url, "config_hash": config_hash(cfg), "code_version": code_version()}
    with TrackedRun.open(cfg.tracking, cfg.name, resume_id=resume_id, tags=tags) as run:
        if not run.resumed:
            run.log_params(cfg.model_dump(mode="json"))
            run.log_dict(deepspeed_config(cfg.train, cfg.scaling.max_workers), "deepspeed_config.json")
        result = fit(cfg, run=run.ref, hooks=hooks, address=address)
        if result.stopped:
            raise RunStopped(cfg.name, result.step, result.checkpoint, result.reason or "stop requested")
        run.log_metrics({"final/step": result.step}, result.step)
        registered = None
        with store.storage.fetch_dir(result.final_checkpoint) as final:
            if cfg.tracking.registered_model:
                registered = run.register(
                    final, name=cfg.tracking.registered_model, alias=cfg.tracking.register_alias,
                    artifact_path="final", normalize=cfg.data.augment.normalize,
                    description=f"pretrained on {cfg.data.train} for {result.step} steps "
                                f"({result.step * cfg.train.global_batch} images) at {cfg.model.image_size}px",
                    tags=lineage_tags(cfg, run_id=run.run_id, step=result.step,
                                      images_seen=result.step * cfg.train.global_batch,
                                      dataset=load_dataset_spec(cfg.data.train, store.storage)),
                )
            else:
                run.log_artifact(final, "final")
    return PretrainResult(cfg.name, url, result.checkpoint, result.final_checkpoint, run.run_id, result.step,
                          result.metrics, registered, run.experiment_id)
