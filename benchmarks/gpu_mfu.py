"""ViT-B/16 at 224 px, bf16, one GPU: training images/s and model FLOPs utilisation through our DeepSpeed engine
(ZeRO-0 on one rank, AdamW, the same step the workers run). Refuses to run without CUDA.

    .venv/bin/python benchmarks/gpu_mfu.py                          # vit_b16, micro batch 128, 30 timed steps
    .venv/bin/python benchmarks/gpu_mfu.py --variant vit_l16 --batch 32 --peak-tflops 989

MFU = 3 x forward FLOPs per image (pipeline.model.flops) x images/s / peak (pipeline.train.throughput: detected
from the GPU's name, H100/H200 SXM bf16 989 TFLOP/s, H100 PCIe 756, A100 312, ...; or --peak-tflops).
benchmarks/gpu_check.py runs `measure` as its first check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(variant: str = "vit_b16", image_size: int = 224, batch: int = 128, steps: int = 30, warmup: int = 10,
            act_checkpoint: bool = False, peak: float | None = None, device: str = "cuda") -> dict:
    """Median step time of `steps` timed engine steps (after `warmup`) on synthetic data, in bf16 on one rank
    (the process group must exist: pipeline.launch.local.init_process_group). Returns the figures."""
    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.flops import forward_flops
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups
    from pipeline.train.throughput import mfu, peak_tflops

    cfg = load_config(ROOT / "configs/pretrain/smoke.yaml", [
        f"model.name={variant}", f"model.image_size={image_size}", "model.num_classes=1000",
        "model.pre_logits=null", f"model.act_checkpoint={str(act_checkpoint).lower()}",
        f"train.micro_batch={batch}", f"train.global_batch={batch}", "train.precision=bf16",
        "train.zero.stage=0", f"train.steps={steps + warmup}", "train.schedule.warmup_steps=0",
        "scaling.num_workers=1",
    ])
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.train, 1, param_groups(model, cfg.train.optim.weight_decay))
    x = torch.randn(batch, 3, image_size, image_size, device=engine.device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (batch,), device=engine.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        sync()
        t = time.perf_counter()
        engine.backward(compute_loss("softmax", engine(x), y))
        engine.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    ips = batch / step_s
    flops = 3 * forward_flops(cfg.model)
    peak = peak_tflops("bf16", peak)
    return {"variant": variant, "image_size": image_size, "batch": batch, "step_ms": step_s * 1e3,
            "images_per_s": ips, "model_tflops": flops * ips / 1e12, "peak_tflops": peak,
            "mfu": mfu(flops, ips, peak, 1), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_b16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--act-checkpoint", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-GPU bf16 peak; default: detected")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device here; this benchmark measures a GPU (run it on a GPU node)", file=sys.stderr)
        return 2
    from pipeline.launch.local import free_port, init_process_group

    init_process_group(0, 1, free_port(), use_gpu=True)
    r = measure(args.variant, args.image_size, args.batch, args.steps, args.warmup, args.act_checkpoint,
                args.peak_tflops)
    print(f"{r['device']}: {args.variant} {args.image_size}px bf16, batch {args.batch}")
    print(f"  step {r['step_ms']:.1f} ms   {r['images_per_s']:.1f} images/s   {r['model_tflops']:.1f} TFLOP/s (model)")
    print(f"  MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s" if r["mfu"] is not None
          else "  MFU: unknown peak (--peak-tflops)")
    print(f"  peak memory {r['peak_memory_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
