"""Transfer's final evaluation (top-1 over a split + few-shot) in the workers: wall time on 1 vs 2 workers over
one fixed split (not a test; prints figures and the ratio).

Each worker is one process with one compute thread (a worker = a device; this machine has 2 cores), running the
evaluation-only spec a Ray worker runs (pipeline.launch.local.run_rank) on a saved model; the time is rank 0's,
from the model load to the all-reduced numbers. Runs are interleaved (1, 2, 1, 2, ...); the median of three is
printed. Ideal ratio 0.5 (each worker embeds its own share; the few-shot solve is rank 0's alone); on a 2-core
machine each rank's DataLoader worker shares the cores with the ranks, so expect more.

  .venv/bin/python benchmarks/transfer_eval.py [--images 512] [--size 64] [--variant vit_ti16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, spec, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.launch.local import init_process_group, run_rank

    torch.set_num_threads(1)
    init_process_group(rank, world, port, use_gpu=False)
    dist.barrier()
    t0 = time.perf_counter()
    metrics = run_rank(spec, rank, world)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"wall_s": time.perf_counter() - t0, **metrics}, default=float))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="images in the evaluation split (the pool is the same)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--variant", default="vit_ti16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import numpy as np
    import torch
    import torch.multiprocessing as mp

    from pipeline.config import load_config
    from pipeline.data.writer import write_array_shards
    from pipeline.launch.local import free_port
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.train.spec import FewshotEval, FinalEval, InitSpec, WorkerSpec

    with tempfile.TemporaryDirectory(prefix="vitpipe-eval-bench-") as tmp:
        rng = np.random.default_rng(0)
        names = [str(i) for i in range(10)]
        urls = [write_array_shards(rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8),
                                   rng.integers(0, 10, args.images), f"{tmp}/{split}", name="synth",
                                   class_names=names, samples_per_shard=64, image_format="jpg")
                for split in ("pool", "test")]
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/smoke.yaml", [
            "name=eval-bench", f"model.name={args.variant}", f"model.image_size={args.size}", "model.num_classes=10",
            f"data.train={urls[0]}", f"data.val={urls[1]}", "data.num_workers=1", "train.global_batch=64",
            "train.micro_batch=32", "train.fewshot_shots=[1,5]", f"scaling.storage_path={tmp}/runs",
            "tracking.sink=null"])
        torch.manual_seed(0)
        ckpt = save_checkpoint(Path(tmp) / "model", build_model(cfg.model).state_dict(), cfg.model, {})
        spec = WorkerSpec(config=cfg, run_url=f"{tmp}/runs/eval", init=InitSpec(checkpoint=str(ckpt)),
                          evaluate_only=True, final_eval=FinalEval(plots=False, class_names=names),
                          fewshot_eval=FewshotEval(pool=urls[0], test=urls[1]))
        walls: dict[int, list[float]] = {1: [], 2: []}
        tops: dict[int, float] = {}
        for _ in range(args.repeats):
            for world in (1, 2):
                out = f"{tmp}/result.json"
                mp.start_processes(_rank, args=(spec, world, free_port(), out), nprocs=world, start_method="spawn")
                r = json.loads(Path(out).read_text())
                walls[world].append(r["wall_s"])
                tops[world] = r["final/top1"]
        one, two = statistics.median(walls[1]), statistics.median(walls[2])
        print(f"transfer evaluation in the workers: {args.variant} {args.size}px, {args.images} eval images "
              f"+ few-shot over {args.images} pool / {args.images} test images, median of {args.repeats}")
        print(f"  1 worker : {one:7.2f} s  (runs: {', '.join(f'{w:.2f}' for w in walls[1])})  top-1 {tops[1]:.4f}")
        print(f"  2 workers: {two:7.2f} s  (runs: {', '.join(f'{w:.2f}' for w in walls[2])})  top-1 {tops[2]:.4f}")
        print(f"  ratio 2/1: {two / one:.2f}  (ideal 0.50)  same top-1: {tops[1] == tops[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
