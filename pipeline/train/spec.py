"""What a training worker is given: one validated object that Ray pickles whole into every worker process. Ids and
URLs flow down in it; the worker's results come back as its return value and Ray reports, nothing else."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import RunConfig
from pipeline.data.storage import Storage
from pipeline.tracking.sinks import RunRef
from pipeline.train.hooks import TrainHooks
from pipeline.train.runstore import RunStore

__all__ = ["InitSpec", "FinalEval", "FewshotEval", "WorkerSpec"]


class InitSpec(BaseModel):
    """Start from these weights instead of a fresh initialisation (transfer jobs). The checkpoint is in the model
    format (model.safetensors + model.json) at a URL every worker can read, already adapted to `config.model`
    (pipeline.model.weights.adapt_state_dict: new head, resampled position embedding)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str = Field(..., description="URL (s3://..., gs://...) or shared path of the initial weights")
    freeze_backbone: bool = Field(False, description="train only head.* (linear probe)")


class FinalEval(BaseModel):
    """The evaluation the workers run on `data.val` once training ends (transfer jobs): top-1 over the whole split
    (or `max_batches` per rank), every rank on its share; the confusion matrix; the pictures. Logged once, by rank 0,
    through the run's sink (metrics final/*, artifacts eval/ and plots/)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batches: int | None = Field(None, gt=0, description="batches per rank; null = the whole split")
    plots: bool = True
    plot_images: int = Field(4, ge=1, le=16)
    class_names: list[str] | None = None


class FewshotEval(BaseModel):
    """An evaluation-only job (transfer's fewshot mode): the frozen features of `pool` (k shots per class drawn from
    it) and `test`, each rank on its share, solved once in closed form. Metrics fewshot/<k>shot."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: str = Field(..., description="manifest URL the shots are drawn from")
    test: str = Field(..., description="manifest URL of the held-out images")
    pool_samples: int | None = Field(None, gt=0, description="images read from the pool; null = all of it")
    test_batches: int | None = Field(None, gt=0, description="batches of the test set per rank; null = all")
    probe: bool = Field(False, description="also a ridge probe on the whole pool (probe/top1)")


class WorkerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    config: RunConfig
    run_url: str = Field(..., description="<scaling.storage_path>/<name>: where the run's checkpoints live")
    run: RunRef = Field(default_factory=RunRef, description="the tracked run rank 0 logs metrics to")
    init: InitSpec | None = None
    hooks: TrainHooks = Field(default_factory=TrainHooks)
    final_eval: FinalEval | None = Field(None, description="evaluate data.val once training ends")
    fewshot_eval: FewshotEval | None = Field(None, description="few-shot evaluation (evaluation-only jobs)")
    evaluate_only: bool = Field(False, description="no training: evaluate `init` with final_eval / fewshot_eval")

    @property
    def store(self) -> RunStore:
        """The run's checkpoints in storage (built where it is used: only the URL and the storage config travel)."""
        return RunStore(self.run_url, Storage(self.config.storage))

    @model_validator(mode="after")
    def _evaluation_only_needs_weights(self) -> "WorkerSpec":
        if self.evaluate_only and (self.init is None or not (self.final_eval or self.fewshot_eval)):
            raise ValueError("an evaluation-only spec needs init (the weights) and final_eval or fewshot_eval")
        if self.fewshot_eval is not None and not self.evaluate_only:
            raise ValueError("fewshot_eval runs in evaluation-only specs (evaluate_only=True)")
        return self
