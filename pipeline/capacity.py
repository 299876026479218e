"""Capacity planning for a pretraining run, by arithmetic: compute, memory per GPU, wall time, input bandwidth.

Compute: training FLOPs per image = 3 x forward FLOPs (the paper's accounting, Table 6), of the configured model
(its head and pre-logits included, as the training loop counts for MFU), matrix products only (model/flops.py).
The shipped JFT recipes land within 0.2% of the paper's Table 6 (ViT-H/14, 14 epochs: 4,258.6 vs 4,262
exaFLOPs, a gap the size of the bias adds and LayerNorms that timm's counter includes and this one leaves out),
except ViT-B/32, which the paper lists 2% below its own 3 x forward rule (55 vs 56.3).
Model-state memory per GPU for mixed-precision Adam (ZeRO paper, Rajbhandari et al. 2020, Fig. 1): with Ψ
parameters and N data-parallel ranks, 2Ψ fp16/bf16 weights + 2Ψ gradients + 12Ψ optimizer states (fp32 master
weights, momentum, variance) = 16Ψ bytes; stage 1 shards the optimizer states (4Ψ + 12Ψ/N), stage 2 also the
gradients (2Ψ + 14Ψ/N), stage 3 also the weights (16Ψ/N).
Activations: Korthikanti et al. 2022 ("Reducing activation recomputation"), per layer and sample with sequence s
and width h in 16-bit: 34·s·h bytes plus 5·a·s² for the attention matrices, which a fused attention kernel
(SDPA flash/memory-efficient) does not keep; with activation checkpointing only each block's input (2·s·h) is kept
plus one block's full activations during recomputation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.config import RunConfig
from pipeline.model.flops import forward_flops, param_count
from pipeline.model.variants import get_variant
from pipeline.train.throughput import gpu

__all__ = ["Plan", "make_plan", "format_plan", "zero_model_state_bytes", "CPU_DECODE_RATE"]

# JPEG decode + train augmentation (RandomResizedCrop to 224, flip) per CPU core, images/s: benchmarks/loader.py's
# tight loop over 500x375 q90 JPEGs on this project's 2-core x86 machine (934/s). A cluster's cores differ: measure
# yours with that script and pass --decode-rate.
CPU_DECODE_RATE = 934.0

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, SXM parts, no sparsity).


def zero_model_state_bytes(params: int, world: int) -> dict[int, float]:
    """Bytes of model state per rank for ZeRO stages 0-3 (mixed-precision Adam, 16 bytes/param in all)."""
    psi = float(params)
    return {
        0: 16 * psi,
        1: 4 * psi + 12 * psi / world,
        2: 2 * psi + 14 * psi / world,
        3: 16 * psi / world,
    }


@dataclass(frozen=True)
class Plan:
    variant: str
    image_size: int
    params: int
    forward_gflops_per_image: float
    train_gflops_per_image: float
    steps: int
    global_batch: int
    images_seen: int
    epochs: float | None
    total_exaflops: float
    gpus: int
    gpu_type: str
    mfu: float
    images_per_s: float
    wall_hours: float
    gpu_hours: float
    zero_state_gib: dict[int, float]
    activation_gib: float
    activation_gib_checkpointed: float
    micro_batch: int
    bytes_per_sample: float | None
    input_mb_per_s: float | None
    decode_rate: float = CPU_DECODE_RATE  # images/s one CPU core decodes and augments
    decode_cores_per_gpu: float = 0.0     # CPU cores per GPU that keep it fed when the workers decode


def _activation_bytes(cfg: RunConfig, checkpointed: bool) -> float:
    v = get_variant(cfg.model.name)
    seq = (cfg.model.image_size // v.patch_size) ** 2 + 1
    per_layer = 34 * seq * v.width * cfg.train.micro_batch  # bytes in 16-bit, fused attention
    if checkpointed:
        return 2 * seq * v.width * cfg.train.micro_batch * v.depth + per_layer
    return per_layer * v.depth


def make_plan(
    cfg: RunConfig,
    *,
    gpus: int,
    gpu_type: str = "h100",
    mfu: float = 0.4,
    num_samples: int | None = None,
    bytes_per_sample: float | None = None,
    decode_rate: float = CPU_DECODE_RATE,
) -> Plan:
    """Plans `cfg` on `gpus` accelerators of `gpu_type` running at model-FLOPs utilisation `mfu`."""
    if gpus <= 0:
        raise ValueError(f"--gpus must be positive, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if decode_rate <= 0:
        raise ValueError(f"--decode-rate must be positive (images/s per core), got {decode_rate}")
    try:
        peak = gpu(gpu_type).peak.get("bf16") or gpu(gpu_type).peak["fp16"]  # 16-bit training
    except ValueError as e:
        raise ValueError(f"--gpu-type: {e}") from None
    fwd = forward_flops(cfg.model)
    train_per_image = 3 * fwd
    images = cfg.train.steps * cfg.train.global_batch
    total = train_per_image * images
    rate = gpus * peak * 1e12 * mfu  # achieved FLOP/s
    wall_s = total / rate
    images_per_s = rate / train_per_image
    params = param_count(cfg.model)
    gib = 2.0**30
    return Plan(
        variant=cfg.model.name,
        image_size=cfg.model.image_size,
        params=params,
        forward_gflops_per_image=fwd / 1e9,
        train_gflops_per_image=train_per_image / 1e9,
        steps=cfg.train.steps,
        global_batch=cfg.train.global_batch,
        images_seen=images,
        epochs=images / num_samples if num_samples else None,
        total_exaflops=total / 1e18,
        gpus=gpus,
        gpu_type=gpu_type,
        mfu=mfu,
        images_per_s=images_per_s,
        wall_hours=wall_s / 3600,
        gpu_hours=wall_s * gpus / 3600,
        zero_state_gib={k: v / gib for k, v in zero_model_state_bytes(params, gpus).items()},
        activation_gib=_activation_bytes(cfg, checkpointed=False) / gib,
        activation_gib_checkpointed=_activation_bytes(cfg, checkpointed=True) / gib,
        micro_batch=cfg.train.micro_batch,
        bytes_per_sample=bytes_per_sample,
        input_mb_per_s=images_per_s * bytes_per_sample / 1e6 if bytes_per_sample else None,
        decode_rate=decode_rate,
        decode_cores_per_gpu=images_per_s / gpus / decode_rate,
    )


def format_plan(plan: Plan) -> str:
    p = asdict(plan)
    epochs = f"{plan.epochs:.2f}" if plan.epochs is not None else "unknown (no manifest)"
    bw = (
        f"{plan.input_mb_per_s:,.0f} MB/s ({plan.input_mb_per_s / plan.gpus:,.1f} MB/s per GPU, "
        f"{plan.bytes_per_sample / 1e3:,.1f} kB/sample)"
        if plan.input_mb_per_s is not None
        else "unknown (give --bytes-per-sample or a manifest with shard sizes)"
    )
    lines = [
        f"model            {p['variant']} @ {p['image_size']} px, {plan.params / 1e6:,.2f}M params",
        f"FLOPs/image      forward {plan.forward_gflops_per_image:,.2f} GFLOPs, training (3x) "
        f"{plan.train_gflops_per_image:,.2f} GFLOPs",
        f"schedule         {plan.steps:,} steps x {plan.global_batch:,} = {plan.images_seen:,} images seen, "
        f"{epochs} epochs",
        f"total compute    {plan.total_exaflops:,.1f} exaFLOPs",
        f"throughput       {plan.gpus} x {plan.gpu_type} at MFU {plan.mfu:.2f}: {plan.images_per_s:,.0f} images/s",
        f"wall time        {plan.wall_hours:,.1f} h ({plan.wall_hours / 24:,.2f} days), "
        f"{plan.gpu_hours:,.0f} GPU-hours",
        "model state/GPU  " + ", ".join(f"ZeRO-{k}: {v:,.2f} GiB" for k, v in plan.zero_state_gib.items())
        + "  (16 B/param mixed-precision Adam)",
        f"activations/GPU  {plan.activation_gib:,.2f} GiB at micro-batch {plan.micro_batch} "
        f"({plan.activation_gib_checkpointed:,.2f} GiB with activation checkpointing)",
        f"input bandwidth  {bw}",
        f"decode (CPU)     {plan.images_per_s / plan.gpus:,.0f} images/s per GPU = {plan.decode_cores_per_gpu:,.1f} "
        f"cores per GPU at {plan.decode_rate:,.0f} images/s per core (--decode-rate; benchmarks/loader.py measures it)",
        "decode (GPU)     data.decode_device: cuda leaves the CPUs tar reads and header checks; the batch is decoded "
        "by nvJPEG on the GPU (its rate: benchmarks/gpu_check.py, not yet measured here)",
    ]
    return "\n".join(lines)
