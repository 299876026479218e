"""Typed configuration of the optimiser, schedule and DeepSpeed engine (owned by pipeline.train)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OptimConfig", "ScheduleConfig", "ZeroConfig", "TrainConfig"]


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["adamw", "sgd"] = Field("adamw", description="adamw = Adam with decoupled weight decay")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(0.1, ge=0, description="decoupled; never applied to the model's no_weight_decay()")
    grad_clip: float = Field(1.0, ge=0, description="global-norm clipping; 0 = off")


class ScheduleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    warmup_steps: int = Field(10_000, ge=0)
    decay: Literal["linear", "cosine", "constant"] = "linear"
    end_lr_fraction: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of the peak")


class ZeroConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="stage 3 only")
    bucket_elements: int | None = Field(
        None, gt=0, description="elements per gradient-reduction / all-gather bucket (communication buffers); "
        "null = DeepSpeed's defaults (5e8: large, sized for big GPU jobs)"
    )

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> "ZeroConfig":
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params requires stage 3, got stage {self.stage}")
        return self


class TrainConfig(BaseModel):
    """The optimisation problem. The global batch is fixed; micro batch x workers x accumulation must equal it."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(..., gt=0, description="optimizer steps")
    global_batch: int = Field(4096, gt=0, description="images per optimizer step, over all workers")
    micro_batch: int = Field(64, gt=0, description="images per worker per forward/backward")
    loss: Literal["softmax", "sigmoid"] = Field("softmax", description="sigmoid = multi-label (JFT/i21k style)")
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    eval_every: int = Field(1000, gt=0, description="validation every K steps (and at the end)")
    eval_batches: int = Field(10, gt=0, description="batches per validation")
    fewshot_every: int = Field(0, ge=0, description="few-shot evaluation every K steps; 0 = off")
    fewshot_shots: list[int] = Field(default_factory=lambda: [1, 5, 10, 25])
    fewshot_l2: float | None = Field(
        None, gt=0, description="ridge regulariser of the closed-form solve; null = chosen per k by leave-one-out "
        "on the support set from a log grid 2^-10 ... 2^15"
    )
    fewshot_seeds: int = Field(3, ge=1, description="draws of the k shots per class; the metric is their mean")
    fewshot_name: str | None = Field(
        None, description="name in the metric fewshot/<name>_<k>shot; null = derived from data.fewshot_train"
    )
    fewshot_pictures: int = Field(
        4, ge=0, le=16, description="at each few-shot evaluation rank 0 logs attention rollout on this many fixed "
        "validation images (data.val, else the few-shot test set) and the position-embedding similarity as MLflow "
        "images (series pictures/attention_rollout, pictures/pos_embed_similarity); 0 = no pictures"
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="Polyak averaging: exponential moving average of the weights, updated every "
        "optimizer step (the paper's 0.9999 for high-resolution fine-tunes); 0 = off. When on, evaluations run "
        "with both the raw and the averaged weights and the averaged ones are exported"
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s of one device at the training precision, for MFU; null = detect "
        "from the GPU name (H100, A100, ...); no MFU on CPU unless set"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})"
            )
        if any(k <= 0 for k in self.fewshot_shots):
            raise ValueError(f"fewshot_shots must be positive, got {self.fewshot_shots}")
        return self
