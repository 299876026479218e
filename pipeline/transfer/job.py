"""The transfer job (what `vitpipe transfer` and the Ray job `python -m jobs.transfer` run): resolve and check
everything before any worker starts, then

    with TrackedRun.open(cfg.tracking, cfg.name) as run:
        fit(training_config(cfg, model), run=run.ref, init=...)   # or the closed-form few-shot evaluation
        evaluate, draw the figures, run.register(...)

Adapting the source to the task happens once, on the driver (pipeline.model.weights.adapt_state_dict: the
pretraining head and pre-logits dropped, a zero-initialised head for the downstream classes, the position
embeddings resampled to the new grid). The adapted weights travel to the workers through storage, under the run's
own folder (`<run_url>/init`, removed when training ends), never as a path on the driver's disk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig
from pipeline.model.config import ModelConfig
from pipeline.transfer.config import TransferModelConfig, TransferRunConfig

__all__ = ["PreparedTransfer", "TransferResult", "finetune_model_config", "prepare_transfer", "training_config",
           "run_transfer"]

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
            "source.registered_model": self.source.name,
            "source.version": self.source.version,
            "source.run_id": self.source.run_id or "",
            "source.uri": self.source.uri,
            "source.resolution": str(self.source_model.image_size),
            "transfer.mode": self.cfg.transfer.mode,
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
    from pipeline.model.variants import get_variant

    patch = get_variant(source.name).patch_size
    if task.image_size % patch:
        fits = sorted({task.image_size // patch * patch, (task.image_size // patch + 1) * patch} - {0})
        raise ConfigError(
            f"model.image_size {task.image_size} is not a multiple of the source model's patch size {patch} "
            f"({source.name}); use e.g. {' or '.join(map(str, fits))}"
        )
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
    from pipeline.data.manifest import load_dataset_spec
    from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.model.weights import adapt_state_dict
    from pipeline.tracking.registry import download_checkpoint, parse_model_uri

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
    train_manifest = load_dataset_spec(cfg.data.train, cfg.storage)
    val_manifest = load_dataset_spec(cfg.data.val, cfg.storage)
    _check_manifest(train_manifest, "train", cfg.data.train, model.num_classes)
    _check_manifest(val_manifest, "val", cfg.data.val, model.num_classes)
    adapted = adapt_state_dict(state_dict, src_model, model)
    init_dir = save_checkpoint(workdir / "init", adapted, model, {"source": version.uri})
    log.info(
        "transfer from %s (version %s, %s at %d px) -> %d classes at %d px, mode %s",
        uri, version.version, src_model.name, src_model.image_size, model.num_classes, model.image_size,
        cfg.transfer.mode,
    )
    return PreparedTransfer(cfg, version, src_model, model, init_dir, train_manifest, val_manifest, workdir)


def _loader(prep: PreparedTransfer, which: str, batch_size: int):
    from pipeline.data.loader import build_loader

    cfg = prep.cfg
    manifest = prep.train_manifest if which == "train" else prep.val_manifest
    return build_loader(
        manifest, cfg.data, cfg.storage, batch_size=batch_size, image_size=prep.model.image_size,
        in_chans=prep.model.in_chans, train=False, rank=0, world_size=1, num_classes=prep.model.num_classes,
        drop_last=False,
    )


def _take(batches, limit: int | None):
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            return
        yield batch


def _fewshot(prep: PreparedTransfer, model) -> dict[str, float]:
    """Closed-form few-shot linear evaluation of the frozen (resampled) source features: k shots per class drawn
    from data.train, accuracy on data.val."""
    from pipeline.eval.fewshot import extract_features, fewshot_accuracy

    cfg = prep.cfg
    bs = cfg.train.micro_batch
    limit = None if cfg.transfer.fewshot_train_samples is None else -(-cfg.transfer.fewshot_train_samples // bs)
    tr_x, tr_y = extract_features(model, _take(_loader(prep, "train", bs), limit))
    te_x, te_y = extract_features(model, _take(_loader(prep, "val", bs), cfg.transfer.final_eval_batches))
    accs = fewshot_accuracy(tr_x, tr_y, te_x, te_y, cfg.train.fewshot_shots, cfg.train.fewshot_l2, cfg.train.seed)
    return {f"fewshot/{k}shot": acc for k, acc in accs.items()}


def _final_eval(prep: PreparedTransfer, model) -> tuple[dict[str, float], Any, Any]:
    """Top-1 on data.val (final_eval_batches or the whole split); returns metrics, confusion matrix, images."""
    import torch

    from pipeline.eval.plots import confusion_matrix

    model.eval()
    labels, preds, shown = [], [], None
    with torch.no_grad():
        for batch in _take(_loader(prep, "val", prep.cfg.train.micro_batch), prep.cfg.transfer.final_eval_batches):
            x = batch["image"].float()
            preds.append(model(x).argmax(1))
            labels.append(batch["label"].long())
            if shown is None:
                shown = x[: prep.cfg.transfer.plot_images].clone()
    if not labels:
        raise ValueError(f"final evaluation: data.val ({prep.cfg.data.val}) yielded no batches")
    y, p = torch.cat(labels), torch.cat(preds)
    cm = confusion_matrix(y, p, prep.model.num_classes)
    metrics = {"final/top1": float((y == p).double().mean()), "final/eval_images": float(len(y))}
    return metrics, cm, shown


def _plots(prep: PreparedTransfer, model, images, cm, outdir: Path) -> list[Path]:
    from pipeline.eval.plots import plot_attention_rollout, plot_confusion_matrix, plot_pos_embed_similarity

    out = []
    if images is None:
        images = next(iter(_loader(prep, "val", prep.cfg.transfer.plot_images)))["image"][: prep.cfg.transfer.plot_images]
    out.append(plot_attention_rollout(model, images.float(), outdir / "attention_rollout.png"))
    out.append(plot_pos_embed_similarity(model.pos_embed, outdir / "pos_embed_similarity.png", model.num_prefix_tokens))
    if cm is not None:
        names = getattr(prep.val_manifest, "class_names", None)
        out.append(plot_confusion_matrix(cm, outdir / "confusion_matrix.png", names))
    return out


def training_config(cfg: TransferRunConfig, model: ModelConfig, *, name: str | None = None) -> RunConfig:
    """The RunConfig the training workers run for a transfer job (and for the demo's from-scratch baseline): the
    fine-tuning `model` with the job's data, train, scaling, storage and tracking sections. No few-shot sets and
    no registration in it: the job's driver evaluates and registers after training."""
    from pipeline.config import validate

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


def run_transfer(cfg: TransferRunConfig, *, source: str | None = None, workdir: str | Path | None = None,
                 address: str | None = None) -> TransferResult:
    """The whole transfer job (see the module docstring). Bad input raises ConfigError/RegistryError before the
    tracked run or any worker exists; a stop (SIGTERM, `vitpipe jobs stop`) raises RunStopped (run KILLED)."""
    from pipeline.launch.trainer import check_cluster, connect_ray, fit, preflight, run_exists, run_url
    from pipeline.model.checkpoint import load_model
    from pipeline.tracking.registry import lineage_tags
    from pipeline.tracking.run import RunStopped, TrackedRun
    from pipeline.train.checkpoint import fetch_checkpoint, remove_dir, upload_dir
    from pipeline.train.spec import InitSpec

    own_tmp = tempfile.TemporaryDirectory(prefix="vitpipe-transfer-") if workdir is None else None
    workdir = Path(own_tmp.name if own_tmp else workdir)
    try:
        prep = prepare_transfer(cfg, source=source, workdir=workdir)
        train_cfg = training_config(cfg, prep.model)
        finetune = cfg.transfer.mode != "fewshot"
        if finetune:
            preflight(train_cfg)
            connect_ray(address or cfg.scaling.address)
            check_cluster(train_cfg)
            if run_exists(run_url(train_cfg), cfg.storage):
                raise ConfigError(f"run {cfg.name!r} already exists at {run_url(train_cfg)}; choose another name "
                                  "(--set name=...)")
        final_dir, registered, artifacts = None, None, []
        with TrackedRun.open(cfg.tracking, cfg.name, tags=prep.source_tags) as run:
            run.log_params(_params(prep))
            if finetune:
                init_url = run_url(train_cfg) + "/init"
                upload_dir(prep.init_dir, init_url, cfg.storage)
                try:
                    trained = fit(train_cfg, run=run.ref, address=address, init=InitSpec(
                        checkpoint=init_url, freeze_backbone=cfg.transfer.mode == "linear_probe"))
                finally:
                    remove_dir(init_url, cfg.storage)
                if trained.stopped:
                    raise RunStopped(cfg.name, trained.step, trained.checkpoint, trained.reason or "stop requested")
                final_dir = workdir / "final"
                with fetch_checkpoint(trained.final_checkpoint, cfg.storage) as local:
                    shutil.copytree(local, final_dir, dirs_exist_ok=True)
                model = load_model(final_dir)
                metrics, cm, images = _final_eval(prep, model)
            else:
                model = load_model(prep.init_dir)
                metrics, cm, images = _fewshot(prep, model), None, None
            run.log_metrics(metrics, cfg.train.steps if finetune else 0)
            if cfg.transfer.plots:
                for png in _plots(prep, model, images, cm, workdir / "plots"):
                    run.log_artifact(png, "plots")
                    artifacts.append(f"plots/{png.name}")
            if cm is not None:
                run.log_dict({"matrix": cm.tolist()}, "eval/confusion_matrix.json")
                artifacts.append("eval/confusion_matrix.json")
            if final_dir is not None and cfg.tracking.registered_model:
                tags = lineage_tags(
                    cfg, run_id=run.run_id, step=cfg.train.steps,
                    images_seen=cfg.train.steps * cfg.train.global_batch, dataset=prep.train_manifest,
                    model_cfg=prep.model, extra={**prep.source_tags, "final_top1": metrics.get("final/top1")},
                )
                registered = run.register(final_dir, name=cfg.tracking.registered_model,
                                          alias=cfg.tracking.register_alias, tags=tags)
                run.set_tags({"registered_model": f"{registered.name}/{registered.version}"})
        return TransferResult(run.run_id, metrics, registered, artifacts, final_dir)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
