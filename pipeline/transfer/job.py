"""The transfer driver: resolve and check everything before any worker starts, then fine-tune (with the pretraining
worker, given an init checkpoint) or evaluate few-shot, evaluate, draw the figures, log and register.

Adapting the source to the task happens here, once, on the driver: the pretraining head and pre-logits are dropped,
a zero-initialised head for the downstream classes is attached and the position embeddings are resampled to the
new grid (pipeline.model.weights.adapt_state_dict). The workers then start from an ordinary checkpoint whose
shapes already match.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.transfer.config import TransferRunConfig

__all__ = ["PreparedTransfer", "TransferResult", "finetune_model_config", "prepare_transfer", "run_transfer"]

log = logging.getLogger(__name__)


@dataclass
class PreparedTransfer:
    """Everything checked and materialised before training: the source version, the fine-tuning ModelConfig,
    the adapted initial weights and the datasets' manifests."""

    cfg: TransferRunConfig
    source: Any  # registry.RegisteredVersion
    source_model: Any  # ModelConfig of the registered checkpoint
    model: Any  # ModelConfig fine-tuned
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


def finetune_model_config(source, task, *, keep_pre_logits: bool = False):
    """The fine-tuning ModelConfig: the source's architecture with the task's resolution, classes and dropout.
    Raises a ConfigError when the resolution does not fit the patch size."""
    from pipeline.model.config import ModelConfig
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


def _worker_config(prep: PreparedTransfer):
    """The pretraining RunConfig the shared worker runs: the fine-tuning model, the transfer job's sections; the
    worker does not register (the driver does, after the final evaluation, with the source lineage)."""
    from pipeline.config import RunConfig

    cfg = prep.cfg
    return RunConfig(
        name=cfg.name,
        model=prep.model,
        data=cfg.data.model_copy(update={"fewshot_train": None, "fewshot_test": None}),
        train=cfg.train.model_copy(update={"fewshot_every": 0}),
        scaling=cfg.scaling,
        storage=cfg.storage,
        tracking=cfg.tracking.model_copy(update={"registered_model": None}),
    )


def _finetune(prep: PreparedTransfer) -> Any:
    """Runs the shared pretraining worker (pipeline.launch.trainer) from the adapted init checkpoint. Returns its
    PretrainResult: `final_checkpoint` (<storage>/<name>/final) and the MLflow `run_id` it logged to."""
    from pipeline.launch.trainer import run_pretraining

    init = {
        "checkpoint": str(prep.init_dir),
        "reset_head": False,  # the driver already attached the zero head and resampled the position embedding
        "freeze_backbone": prep.cfg.transfer.mode == "linear_probe",
    }
    result = run_pretraining(_worker_config(prep), resume=False, init=init)
    if not result.final_checkpoint:
        raise RuntimeError(f"transfer run {prep.cfg.name}: training reported no final checkpoint")
    return result


def run_transfer(
    cfg: TransferRunConfig, *, source: str | None = None, workdir: str | Path | None = None
) -> TransferResult:
    """The whole transfer job (see the module docstring). Bad input raises ConfigError/RegistryError before any
    worker starts."""
    from mlflow import MlflowClient

    from pipeline.model.checkpoint import load_model
    from pipeline.tracking.registry import lineage_tags, register_checkpoint, resolve_tracking_uri
    from pipeline.tracking.sinks import MlflowSink, create_run, end_run, flatten_params
    from pipeline.train.checkpoint import fetch_checkpoint

    own_tmp = tempfile.TemporaryDirectory(prefix="vitpipe-transfer-") if workdir is None else None
    workdir = Path(own_tmp.name if own_tmp else workdir)
    try:
        prep = prepare_transfer(cfg, source=source, workdir=workdir)
        tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})})
        prep.cfg = cfg
        client = MlflowClient(tracking_uri)
        run_id = None
        try:
            if cfg.transfer.mode == "fewshot":
                model = load_model(prep.init_dir)
                final_dir = None
                run_id = create_run(cfg.tracking, cfg.name, tags=prep.source_tags)
                metrics, cm, images = _fewshot(prep, model), None, None
            else:
                trained = _finetune(prep)
                # The worker created and finished the run; the driver adds the source link, final evaluation,
                # figures and registration to it (a run of its own when the worker logged elsewhere).
                run_id = trained.run_id or create_run(cfg.tracking, cfg.name)
                for k, v in prep.source_tags.items():
                    client.set_tag(run_id, k, v)
                final_dir = Path(workdir / "final")
                with fetch_checkpoint(trained.final_checkpoint, cfg.storage) as local:
                    shutil.copytree(local, final_dir, dirs_exist_ok=True)
                model = load_model(final_dir)
                metrics, cm, images = _final_eval(prep, model)
            sink = MlflowSink(tracking_uri, run_id, cfg.tracking.flush_every_s)
            params = {f"resolved.model.{k}": v for k, v in prep.model.model_dump(mode="json").items()}
            if cfg.transfer.mode == "fewshot":
                params.update(flatten_params(cfg.model_dump(mode="json")))
            params.update({"transfer.source": prep.source.uri, "transfer.mode": cfg.transfer.mode})
            sink.log_params(params)
            sink.close()
            step = cfg.train.steps if cfg.transfer.mode != "fewshot" else 0
            for k, v in metrics.items():
                client.log_metric(run_id, k, v, step=step)
            artifacts = []
            if cfg.transfer.plots:
                for png in _plots(prep, model, images, cm, workdir / "plots"):
                    client.log_artifact(run_id, str(png), "plots")
                    artifacts.append(f"plots/{png.name}")
            if cm is not None:
                client.log_dict(run_id, {"matrix": cm.tolist()}, "eval/confusion_matrix.json")
                artifacts.append("eval/confusion_matrix.json")
            registered = None
            if final_dir is not None and cfg.tracking.registered_model:
                tags = lineage_tags(
                    cfg, run_id=run_id, step=cfg.train.steps,
                    images_seen=cfg.train.steps * cfg.train.global_batch, dataset=prep.train_manifest,
                    model_cfg=prep.model, extra={**prep.source_tags, "final_top1": metrics.get("final/top1")},
                )
                registered = register_checkpoint(
                    final_dir, name=cfg.tracking.registered_model, run_id=run_id, tracking_uri=tracking_uri,
                    experiment=cfg.tracking.experiment, alias=cfg.tracking.register_alias, tags=tags,
                )
                client.set_tag(run_id, "registered_model", f"{registered.name}/{registered.version}")
        except BaseException:
            if run_id:
                end_run(cfg.tracking, run_id, "FAILED")
            raise
        end_run(cfg.tracking, run_id, "FINISHED")
        return TransferResult(run_id, metrics, registered, artifacts, final_dir)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
