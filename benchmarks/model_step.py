"""Training-step throughput of our ViT against timm's equivalent: forward + backward + AdamW step, fp32, CPU.

Both models are built at the same variant / batch / resolution / thread count and measured alternately in one
process (A, B, A, B, ...) so drift on a shared machine hits both alike. Prints images/s for each (median over
rounds) and the ratio ours / timm.

    .venv/bin/python benchmarks/model_step.py                       # vit_ti16, batch 8, 224 px, 2 threads
    .venv/bin/python benchmarks/model_step.py --variant vit_s16 --batch 4 --iters 3 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _timm_model(variant: str, image_size: int, num_classes: int) -> torch.nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from pipeline.model.variants import get_variant

    v = get_variant(variant)
    if v.timm_name:
        return timm.create_model(v.timm_name, img_size=image_size, num_classes=num_classes)
    return TimmViT(img_size=image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                   num_heads=v.heads, mlp_ratio=v.mlp_dim / v.width, num_classes=num_classes)


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _time(step, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="vit_ti16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=3, help="training steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (each model once per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from pipeline.model import ModelConfig, build_model
    from pipeline.model.flops import forward_flops

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(name=args.variant, image_size=args.image_size, num_classes=args.num_classes)
    ours = build_model(cfg)
    theirs = _timm_model(args.variant, args.image_size, args.num_classes)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_timm = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_timm:
        raise SystemExit(f"not the same model: ours has {n_ours} parameters, timm {n_timm}")
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.num_classes, (args.batch,))
    steps = {"ours": _step_fn(ours, x, y), "timm": _step_fn(theirs, x, y)}
    for step in steps.values():
        _time(step, args.warmup)

    rates: dict[str, list[float]] = {"ours": [], "timm": []}
    for r in range(args.rounds):
        order = ("ours", "timm") if r % 2 == 0 else ("timm", "ours")  # alternate who goes first too
        for name in order:
            rates[name].append(args.iters * args.batch / _time(steps[name], args.iters))

    med = {k: statistics.median(v) for k, v in rates.items()}
    tflops = 3 * forward_flops(cfg) / 1e12
    print(f"variant {args.variant}  batch {args.batch}  {args.image_size} px  threads {args.threads}  "
          f"params {n_ours / 1e6:.2f}M  rounds {args.rounds} x {args.iters} steps (AdamW, fp32, CPU)")
    for name in ("ours", "timm"):
        spread = f"[{min(rates[name]):.2f} .. {max(rates[name]):.2f}]"
        print(f"  {name:<5} {med[name]:8.2f} img/s  {spread:<18} {med[name] * tflops * 1e3:7.1f} GFLOP/s")
    print(f"ratio ours/timm = {med['ours'] / med['timm']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
