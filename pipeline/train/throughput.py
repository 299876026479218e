"""Model FLOPs utilisation: analytic training FLOPs (3 x forward, pipeline.model.flops) per second over the
devices' peak. Peaks are dense tensor-core figures from the vendors' data sheets."""

from __future__ import annotations

import torch

__all__ = ["PEAK_TFLOPS", "peak_tflops", "mfu"]

# device-name substring -> precision -> dense peak TFLOP/s (fp32 = TF32 tensor cores)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def peak_tflops(precision: str, configured: float | None = None, device_name: str | None = None) -> float | None:
    """The configured peak, else the table's entry for this CUDA device, else None (CPU: configure it or no MFU)."""
    if configured:
        return configured
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, table in PEAK_TFLOPS.items():
        if key in device_name:
            return table.get(precision)
    return None


def mfu(train_flops_per_image: float, images_per_s: float, peak_tflops_per_device: float | None,
        num_devices: int) -> float | None:
    if not peak_tflops_per_device:
        return None
    return train_flops_per_image * images_per_s / (peak_tflops_per_device * 1e12 * num_devices)
