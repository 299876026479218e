"""Typed configuration of storage access and the streaming loader (owned by pipeline.data)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["StorageConfig", "AugmentConfig", "DataConfig", "DEFAULT_READERS", "resolve_readers"]

# 48 serves 1, 2, 3, 4, 6, 8, 12, 16, 24 and 48 workers
DEFAULT_READERS = 48


class StorageConfig(BaseModel):
    """How to reach object storage. Credentials never live here: they come from the standard AWS environment
    variables / profiles (or the cloud's own mechanism)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; null = AWS (or $AWS_ENDPOINT_URL)")
    region: str | None = Field(None, description="null = $AWS_DEFAULT_REGION / profile")
    anon: bool = Field(False, description="anonymous (unsigned) access")
    profile: str | None = Field(None, description="AWS profile name (credentials stay in ~/.aws)")
    max_retries: int = Field(8, ge=0, description="retries on throttling and transient errors")
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode for S3 requests (adaptive adds client-side rate limiting)"
    )
    backoff_base_s: float = Field(0.2, gt=0)
    backoff_max_s: float = Field(10.0, gt=0)
    read_block_size: int = Field(8 * 2**20, gt=0, description="bytes per ranged read when streaming shards")
    read_ahead_blocks: int = Field(
        2, ge=0, description="blocks of read_block_size a loader worker reads ahead of decoding, across shard "
        "boundaries (a background thread: the next shard arrives while this one decodes); 0 = read inline")


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range (Inception-style)")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3))
    hflip: bool = True
    normalize: Literal["inception", "imagenet"] = Field(
        "inception", description="inception = values in [-1, 1] (the paper's); imagenet = ImageNet mean/std"
    )
    eval_crop_fraction: float = Field(0.875, gt=0, le=1.0, description="resize to size/fraction, centre-crop size")

    @model_validator(mode="after")
    def _ranges(self) -> "AugmentConfig":
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        return self


class DataConfig(BaseModel):
    """Where the samples come from and how they are streamed. A dataset is a manifest URL
    (`s3://bucket/i21k/manifest.json`) or a brace pattern with a sample count
    (`s3://b/i21k-{000000..013999}.tar|14197122`)."""

    model_config = ConfigDict(extra="forbid")

    train: str = Field(..., description="training set: manifest URL or 'pattern|num_samples'")
    val: str | None = Field(None, description="held-out split for validation (loss, precision@1)")
    fewshot_train: str | None = Field(None, description="small labelled set for few-shot linear evaluation")
    fewshot_test: str | None = None
    num_workers: int = Field(2, ge=0, description="DataLoader workers per rank (at most the rank's virtual readers)")
    virtual_readers: int | None = Field(
        None, ge=1, description="training: each epoch is cut into this many virtual readers, and every step takes "
        "the same samples from each, so the samples of a step do not depend on the world size, micro batch or "
        "DataLoader workers and a checkpoint continues exactly on another number of workers. Every world size must "
        f"divide it (and train.global_batch must be a multiple of micro_batch x workers). null = {DEFAULT_READERS} "
        "(or train.global_batch when smaller); a rank holds virtual_readers / workers open shard streams and "
        "shuffle buffers")
    shuffle_buffer: int = Field(
        256, ge=0, description="samples each virtual reader (training) or DataLoader worker (evaluation) holds for "
        "shuffling; 0 = no sample shuffle")
    seed: int = 0
    on_error: Literal["skip", "fail"] = Field("skip", description="an unreadable shard: skip and count, or raise")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    prefetch_factor: int = Field(2, ge=1)
    decode_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where images are decoded and augmented: 'cpu' in the DataLoader workers (exactly "
        "resumable); 'cuda' on the worker's GPU, JPEGs batched through nvJPEG (needs scaling.use_gpu)")
    synthetic: bool = Field(
        False, description="benchmarking: every step trains on the micro-batches of the first step, read and "
        "decoded once (the loop, its counters and logging unchanged): perf/step_time_s without the input pipeline")


def resolve_readers(data: DataConfig, global_batch: int) -> int:
    """The run's number of virtual readers: `data.virtual_readers`, or its default for this global batch. Refuses
    more readers than samples per step."""
    readers = data.virtual_readers if data.virtual_readers is not None else min(DEFAULT_READERS, global_batch)
    if readers > global_batch:
        raise ValueError(f"data.virtual_readers ({readers}) exceeds train.global_batch ({global_batch}): every reader "
                         "gives at least one sample to every step; lower data.virtual_readers")
    return readers
