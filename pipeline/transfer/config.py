"""Typed configuration of a transfer job: the pretraining RunConfig's sections (data, train, scaling, storage,
tracking reuse their classes) plus `transfer:` and a `model:` section that holds only what a transfer may change:
the architecture itself comes from the registered checkpoint."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.data.config import DataConfig, StorageConfig, resolve_readers
from pipeline.launch.config import ScalingConfig
from pipeline.model.ref import parse_model_uri
from pipeline.tracking.config import TrackingConfig
from pipeline.train.config import TrainConfig

__all__ = ["TransferModelConfig", "TransferConfig", "TransferRunConfig"]


class TransferModelConfig(BaseModel):
    """The downstream task around the pretrained architecture (variant, patch size, channels and classifier come
    from the source checkpoint's model.json)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(384, gt=0, description="fine-tuning resolution; position embeddings are resampled")
    num_classes: int = Field(..., ge=2, description="downstream classes: size of the new zero-initialised head")
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    attn_drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    act_checkpoint: bool = False


class TransferConfig(BaseModel):
    """What to start from and how to transfer. The downstream eval split is `data.val`, evaluated every
    `train.eval_every` steps and at the end (one source of truth: the same fields the pretraining worker reads)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None, description="registered model to start from: models:/NAME@ALIAS or models:/NAME/VERSION "
        "(`vitpipe transfer --from` overrides it)"
    )
    mode: Literal["finetune", "linear_probe", "fewshot"] = Field(
        "finetune", description="finetune = all weights; linear_probe = frozen backbone, train the head; "
        "fewshot = closed-form linear evaluation of frozen features on data.train/data.val, no training"
    )
    keep_pre_logits: bool = Field(
        False, description="keep the pretraining tanh pre-logits layer (the paper drops it when fine-tuning)"
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random = a control: the source's architecture adapted to the task as usual, "
        "with a seeded random initialisation (train.seed) in place of its weights (from-scratch training; "
        "random-feature probes)"
    )
    fewshot_probe: bool = Field(
        False, description="fewshot mode: also a ridge probe on every image of the pool (probe/top1; the "
        "regulariser by leave-one-out)"
    )
    final_eval_batches: int | None = Field(
        None, gt=0, description="batches of data.val in the final evaluation (accuracy, confusion matrix); "
        "null = the whole split"
    )
    plots: bool = Field(True, description="log attention rollout, position-embedding and confusion PNGs")
    plot_images: int = Field(4, ge=1, le=16, description="eval images in the attention-rollout figure")
    fewshot_train_samples: int | None = Field(
        None, gt=0, description="fewshot mode: labelled images read from data.train to draw the k shots from; "
        "null = the whole split"
    )
    group: str | None = Field(
        None, description="the group a suite reports this task's top-1 under "
        "(VTAB-1k: natural, specialized, structured; `vitpipe transfer-suite`); null = only in the overall mean"
    )

    @field_validator("source")
    @classmethod
    def _uri_form(cls, source: str | None) -> str | None:
        if source is not None:
            parse_model_uri(source)
        return source

    @field_validator("group")
    @classmethod
    def _metric_name(cls, group: str | None) -> str | None:
        if group is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", group):
            raise ValueError("a group names a metric (<suite>/<group>): lowercase letters, digits, '_' and '-', "
                             "e.g. natural")
        return group


class TransferRunConfig(BaseModel):
    """Everything one transfer job needs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("transfer", description="run name")
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    model: TransferModelConfig
    data: DataConfig
    train: TrainConfig
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="vit-transfer"))

    @model_validator(mode="after")
    def _needs_eval_split(self) -> "TransferRunConfig":
        if self.data.val is None:
            raise ValueError("data.val (the downstream eval split) is required for a transfer job")
        if self.train.loss != "softmax":
            raise ValueError(f"transfer fine-tunes single-label heads: train.loss must be softmax, got {self.train.loss}")
        self.data.virtual_readers = resolve_readers(self.data, self.train.global_batch)
        return self
