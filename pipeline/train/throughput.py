"""Model FLOPs utilisation: analytic training FLOPs (3 x forward, pipeline.model.flops) per second over the
devices' peak. Peaks are dense (no sparsity) tensor-core figures from the vendors' data sheets; fp32 means TF32
tensor cores. This table is the one source of these figures (the capacity planner reads it too)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["GPU", "GPUS", "gpu", "match_gpu", "peak_tflops", "mfu"]


@dataclass(frozen=True)
class GPU:
    name: str          # what --gpu-type says
    pattern: str       # matched against torch.cuda.get_device_name() (word boundaries: "L40" is not "L4")
    peak: dict         # precision -> dense peak TFLOP/s


# Most specific first: a PCIe or NVL part is matched before the SXM one of the same name.
GPUS: tuple[GPU, ...] = (
    GPU("h100-pcie", r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    GPU("h100-nvl", r"\bH100\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 418.0}),
    GPU("h100", r"\bH100\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    GPU("h200-nvl", r"\bH200\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 418.0}),
    GPU("h200", r"\bH200\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    GPU("a100", r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    GPU("l40s", r"\bL40S\b", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    GPU("l40", r"\bL40\b", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    GPU("l4", r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    GPU("a10", r"\bA10G?\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    GPU("v100", r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),
    GPU("t4", r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
)


def gpu(name: str) -> GPU:
    """The table entry called `name` (h100, a100, ...); a clear error listing the known ones otherwise."""
    for g in GPUS:
        if g.name == name:
            return g
    raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(g.name for g in GPUS)}")


def match_gpu(device_name: str) -> GPU | None:
    """The entry a CUDA device name (e.g. 'NVIDIA H100 PCIe') belongs to, or None."""
    return next((g for g in GPUS if re.search(g.pattern, device_name, re.IGNORECASE)), None)


def peak_tflops(precision: str, configured: float | None = None, device_name: str | None = None) -> float | None:
    """The configured peak, else the table's entry for this CUDA device, else None (CPU: configure it or no MFU)."""
    if configured:
        return configured
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    found = match_gpu(device_name)
    return found.peak.get(precision) if found else None


def mfu(train_flops_per_image: float, images_per_s: float, peak_tflops_per_device: float | None,
        num_devices: int) -> float | None:
    if not peak_tflops_per_device:
        return None
    return train_flops_per_image * images_per_s / (peak_tflops_per_device * 1e12 * num_devices)
