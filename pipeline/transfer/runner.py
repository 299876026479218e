"""The transfer job (what `vitpipe transfer` and the Ray job `python -m jobs.transfer` run): resolve and check
everything before any worker starts, then

    with TrackedRun.open(cfg.tracking, cfg.name) as run:
        fit(training_config(cfg, model), run=run.ref, init=..., final_eval=...)   # the workers evaluate at the end
        run.register(...)                       # (fewshot mode: evaluate(...), the workers' closed-form few-shot)

Adapting the source to the task happens once, on the driver (pipeline.model.weights.adapt_state_dict: the
pretraining head and pre-logits dropped, a zero-initialised head for the downstream classes, the position
embeddings resampled to the new grid). The adapted weights travel to the workers through storage, under the run's
own folder (`<run_url>/init`, removed when training ends), never as a path on the driver's disk. The driver never
runs the model over a dataset: evaluation, its confusion matrix and the pictures come from the workers.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, validate
from pipeline.data.manifest import load_dataset_spec
from pipeline.data.storage import Storage
from pipeline.errors import ConfigError, RunStopped
from pipeline.launch.driver import check_cluster, evaluate, fit, preflight, run_store
from pipeline.launch.fanout import connect_ray
from pipeline.lineage import lineage_tags
from pipeline.model import build_model
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.model.config import ModelConfig, check_image_size
from pipeline.model.ref import parse_model_uri
from pipeline.model.weights import adapt_state_dict
from pipeline.tracking.registry import download_checkpoint
from pipeline.tracking.run import TrackedRun
from pipeline.train.spec import FewshotEval, FinalEval, InitSpec
from pipeline.transfer.config import TransferModelConfig, TransferRunConfig

__all__ = ["PreparedTransfer", "TransferResult", "finetune_model_config", "prepare_transfer", "training_config",
           "final_eval_spec", "run_transfer"]

log = logging.getLogger(__name__)


@dataclass
class PreparedTransfer:
    """Everything checked and materialised before training: the source version, the fine-tuning ModelConfig,
    the adapted initial weights and the datasets' manifests."""

    cfg: TransferRunConfig
    source: Any  # registry.RegisteredVersion
    source_model: ModelConfig  # of the registered checkpoint
    model: ModelConfig  # fine-tuned
    init_dir: Path
    train_manifest: Any
    val_manifest: Any
    workdir: Path

    @property
    def source_tags(self) -> dict[str, str]:
        return {
            "source.model": self.source.name,
            "source.version": self.source.version,
            "source.run_id": self.source.run_id or "",
            "source.uri": self.source.uri,
            "source.resolution": str(self.source_model.image_size),
            "transfer.mode": self.cfg.transfer.mode,
            "transfer.init": self.cfg.transfer.init,
        }


@dataclass
class TransferResult:
    run_id: str
    metrics: dict[str, float]
    registered: Any = None  # registry.RegisteredVersion of the fine-tuned model, when registered
    artifacts: list[str] = field(default_factory=list)
    checkpoint_dir: Path | None = None


def finetune_model_config(source: ModelConfig, task: TransferModelConfig, *,
                          keep_pre_logits: bool = False) -> ModelConfig:
    """The fine-tuning ModelConfig: the source's architecture with the task's resolution, classes and dropout.
    Raises a ConfigError when the resolution does not fit the patch size."""
    try:
        check_image_size(task.image_size, source.name, whose="the source model")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ModelConfig.model_validate(
        {
            **source.model_dump(),
            **task.model_dump(),
            "pre_logits": source.pre_logits if keep_pre_logits else None,
            "head_bias_init": 0.0,
        }
    )


def _check_manifest(manifest: Any, split: str, url: str, num_classes: int) -> None:
    if getattr(manifest, "label_type", "single") != "single":
        raise ConfigError(f"data.{split} ({url}) has {manifest.label_type}-label targets; transfer needs single labels")
    if manifest.num_classes and manifest.num_classes > num_classes:
        raise ConfigError(
            f"data.{split} ({url}) has {manifest.num_classes} classes but model.num_classes is {num_classes}; "
            f"set model.num_classes={manifest.num_classes}"
        )


def prepare_transfer(cfg: TransferRunConfig, *, source: str | None = None, workdir: str | Path) -> PreparedTransfer:
    """Every check that can fail, in order of cost, before any worker starts: the source URI, the registry entry
    (name, version/alias, our checkpoint format), the resolution against the patch size, the datasets' manifests
    against the class count. Then the adapted initial checkpoint is written under `workdir/init`."""
    uri = source or cfg.transfer.source
    if not uri:
        raise ConfigError("no source model: set transfer.source or pass --from models:/NAME@ALIAS")
    parse_model_uri(uri)
    workdir = Path(workdir)
    src_dir, version = download_checkpoint(uri, workdir / "source", cfg.tracking.tracking_uri)
    try:
        state_dict, src_model, _ = load_checkpoint(src_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{uri} (version {version.version}) is not a loadable vitpipe checkpoint: {e}") from None
    model = finetune_model_config(src_model, cfg.model, keep_pre_logits=cfg.transfer.keep_pre_logits)
    storage = Storage(cfg.storage)
    train_manifest = load_dataset_spec(cfg.data.train, storage)
    val_manifest = load_dataset_spec(cfg.data.val, storage)
    _check_manifest(train_manifest, "train", cfg.data.train, model.num_classes)
    _check_manifest(val_manifest, "val", cfg.data.val, model.num_classes)
    adapted = adapt_state_dict(state_dict, src_model, model)
    if cfg.transfer.init == "random":  # the control: same architecture and task, none of the source's weights
        import torch


        torch.manual_seed(cfg.train.seed)
        adapted = build_model(model).state_dict()
    init_dir = save_checkpoint(workdir / "init", adapted, model, {"source": version.uri})
    # a from-scratch baseline says so: it takes the source's architecture and none of its weights
    start = "random init with the architecture of" if cfg.transfer.init == "random" else "transfer from"
    log.info(
        "%s %s (version %s, %s at %d px) -> %d classes at %d px, mode %s",
        start, uri, version.version, src_model.name, src_model.image_size, model.num_classes, model.image_size,
        cfg.transfer.mode,
    )
    return PreparedTransfer(cfg, version, src_model, model, init_dir, train_manifest, val_manifest, workdir)


def training_config(cfg: TransferRunConfig, model: ModelConfig, *, name: str | None = None) -> RunConfig:
    """The RunConfig the training workers run for a transfer job (and for the demo's from-scratch baseline): the
    fine-tuning `model` with the job's data, train, scaling, storage and tracking sections. No few-shot sets and
    no registration in it: the job's driver evaluates and registers after training."""
    tree = cfg.model_dump(mode="json")
    return validate(RunConfig, {
        "name": name or cfg.name,
        "model": model.model_dump(mode="json"),
        "data": {**tree["data"], "fewshot_train": None, "fewshot_test": None},
        "train": {**tree["train"], "fewshot_every": 0},
        "scaling": tree["scaling"],
        "storage": tree["storage"],
        "tracking": {**tree["tracking"], "registered_model": None},
    })


def _params(prep: PreparedTransfer) -> dict[str, Any]:
    """The job's config as run parameters, with the source it actually used and the model it resolved to."""
    tree = prep.cfg.model_dump(mode="json")
    tree["transfer"]["source"] = prep.source.uri
    return {**tree, "resolved": {"model": prep.model.model_dump(mode="json")}}


def _per_rank_batches(cfg: TransferRunConfig) -> int | None:
    """`transfer.final_eval_batches` (over all ranks together) as batches per rank."""
    batches = cfg.transfer.final_eval_batches
    return None if batches is None else -(-batches // cfg.scaling.max_workers)


def final_eval_spec(cfg: TransferRunConfig, class_names: list[str] | None) -> FinalEval:
    """What the workers evaluate once a fine-tune ends: `transfer.final_eval_batches` over all ranks together."""
    return FinalEval(max_batches=_per_rank_batches(cfg), plots=cfg.transfer.plots, plot_images=cfg.transfer.plot_images,
                     class_names=class_names)


def _version_description(prep: PreparedTransfer, metrics: dict[str, float]) -> str:
    """The fine-tuned version's description: what it was fine-tuned from, on what, and how well it did."""
    top1 = metrics.get("final/top1")
    return (f"{prep.cfg.transfer.mode} of {prep.source.uri} (run {prep.source.run_id or '-'}) on "
            f"{prep.cfg.data.train} for {prep.cfg.train.steps} steps at {prep.model.image_size}px"
            + (f"; top-1 {top1:.4f} on {prep.cfg.data.val}" if top1 is not None else ""))


def run_transfer(cfg: TransferRunConfig, *, source: str | None = None, workdir: str | Path | None = None,
                 address: str | None = None) -> TransferResult:
    """The whole transfer job (see the module docstring). Bad input raises ConfigError/RegistryError before the
    tracked run or any worker exists; a stop (SIGTERM, `vitpipe jobs stop`) raises RunStopped (run KILLED). Every
    evaluation (the fine-tune's final one with its pictures, the fewshot mode) runs in the workers."""
    own_tmp = tempfile.TemporaryDirectory(prefix="vitpipe-transfer-") if workdir is None else None
    workdir = Path(own_tmp.name if own_tmp else workdir)
    try:
        prep = prepare_transfer(cfg, source=source, workdir=workdir)
        train_cfg = training_config(cfg, prep.model)
        finetune = cfg.transfer.mode != "fewshot"
        preflight(train_cfg)
        connect_ray(address or cfg.scaling.address)
        check_cluster(train_cfg)
        store = run_store(train_cfg)
        if store.exists():
            raise ConfigError(f"run {cfg.name!r} already exists at {store.url}; choose another name (--set name=...)")
        final_dir, registered, artifacts = None, None, []
        with TrackedRun.open(cfg.tracking, cfg.name, tags=prep.source_tags) as run:
            run.log_params(_params(prep))
            init = InitSpec(checkpoint=store.put_model(prep.init_dir, "init"),
                            freeze_backbone=cfg.transfer.mode == "linear_probe")
            try:
                if finetune:
                    names = getattr(prep.val_manifest, "class_names", None)
                    trained = fit(train_cfg, run=run.ref, address=address, init=init,
                                  final_eval=final_eval_spec(cfg, names))
                else:
                    fewshot = FewshotEval(pool=cfg.data.train, test=cfg.data.val,
                                          pool_samples=cfg.transfer.fewshot_train_samples,
                                          test_batches=_per_rank_batches(cfg), probe=cfg.transfer.fewshot_probe)
                    metrics = evaluate(train_cfg, fewshot=fewshot, init=init, run=run.ref, address=address)
            finally:
                store.remove("init")
            if finetune:
                if trained.stopped:
                    raise RunStopped(cfg.name, trained.step, trained.checkpoint, trained.reason or "stop requested")
                metrics = {k: v for k, v in trained.metrics.items() if k.startswith("final/")}
                if cfg.transfer.plots:
                    artifacts += [f"plots/{n}.png" for n in ("attention_rollout", "pos_embed_similarity",
                                                            "confusion_matrix")]
                artifacts.append("eval/confusion_matrix.json")
                final_dir = workdir / "final"
                with store.storage.fetch_dir(trained.final_checkpoint) as local:
                    shutil.copytree(local, final_dir, dirs_exist_ok=True)
            if final_dir is not None and cfg.tracking.registered_model:
                tags = lineage_tags(
                    cfg, run_id=run.run_id, step=cfg.train.steps,
                    images_seen=cfg.train.steps * cfg.train.global_batch, dataset=prep.train_manifest,
                    model_cfg=prep.model, extra={**prep.source_tags, "final_top1": metrics.get("final/top1")},
                )
                registered = run.register(final_dir, name=cfg.tracking.registered_model,
                                          alias=cfg.tracking.register_alias, tags=tags,
                                          description=_version_description(prep, metrics),
                                          normalize=cfg.data.augment.normalize)
                run.set_tags({"registered_model": f"{registered.name}/{registered.version}"})
        return TransferResult(run.run_id, metrics, registered, artifacts, final_dir)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
