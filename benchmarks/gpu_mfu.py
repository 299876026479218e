"""ViT-B/16 at 224 px, bf16, one GPU: training images/s and model FLOPs utilisation through our DeepSpeed engine
(ZeRO-0 on one rank, AdamW, the same step the workers run). Refuses to run without CUDA.

    .venv/bin/python benchmarks/gpu_mfu.py                          # vit_b16, micro batch 128, 30 timed steps
    .venv/bin/python benchmarks/gpu_mfu.py --variant vit_l16 --batch 32 --peak-tflops 989

MFU = 3 x forward FLOPs per image (pipeline.model.flops) x images/s / peak (detected from the GPU name:
H100/H200 bf16 989 TFLOP/s, A100 312, ...; or --peak-tflops).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402


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

    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.model.flops import forward_flops
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups
    from pipeline.train.throughput import mfu, peak_tflops

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/smoke.yaml", [
        f"model.name={args.variant}", f"model.image_size={args.image_size}", "model.num_classes=1000",
        "model.pre_logits=null", f"model.act_checkpoint={str(args.act_checkpoint).lower()}",
        f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}", "train.precision=bf16",
        "train.zero.stage=0", f"train.steps={args.steps + args.warmup}", "train.schedule.warmup_steps=0",
        "scaling.num_workers=1",
    ])
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.train, 1, param_groups(model, cfg.train.optim.weight_decay))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=engine.device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (args.batch,), device=engine.device)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.backward(compute_loss("softmax", engine(x), y))
        engine.step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    ips = args.batch / step_s
    flops = 3 * forward_flops(cfg.model)
    peak = peak_tflops("bf16", args.peak_tflops)
    m = mfu(flops, ips, peak, 1)
    print(f"{torch.cuda.get_device_name()}: {args.variant} {args.image_size}px bf16, batch {args.batch}")
    print(f"  step {step_s * 1e3:.1f} ms   {ips:.1f} images/s   {flops * ips / 1e12:.1f} TFLOP/s (model)")
    print(f"  MFU {100 * m:.1f}% of {peak:.0f} TFLOP/s" if m is not None else "  MFU: unknown peak (--peak-tflops)")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
