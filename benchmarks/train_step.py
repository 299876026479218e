"""Overhead of our distributed training step: Ray Train + DeepSpeed ZeRO-2 (2 CPU workers, gloo) against plain
torch.distributed DDP (2 processes, gloo), same model, same in-memory batch, same optimizer (AdamW), fp32.
Then the per-rank model-state memory of ZeRO 1/2/3 (bf16 mixed precision, 2 ranks) against the ZeRO paper's
formula (Rajbhandari et al. 2020: 16 bytes/param = 2 fp16 params + 2 fp16 grads + 12 fp32 master+Adam; per rank
stage 1: 4 + 12/N, stage 2: 2 + 14/N, stage 3: 16/N).

    .venv/bin/python benchmarks/train_step.py                      # vit_nano4 32 px, micro 32, 30 steps
    .venv/bin/python benchmarks/train_step.py --variant vit_pico4 --image-size 28 --steps 50
    .venv/bin/python benchmarks/train_step.py --skip-speed          # memory table only

Memory is measured as the bytes of every live tensor storage the rank holds after one optimizer step (found
through the garbage collector, deduplicated by storage), minus what it held before the engine existed, taken after
the second backward pass (gradients and Adam moments both live): the parameters, gradient buffers, fp32 master
weights and Adam moments DeepSpeed keeps in Python-visible tensors, plus its communication buckets (--bucket).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitpipe" / "torch_extensions"))

import torch  # noqa: E402


def _cfg(args, stage: int, precision: str, workers: int):
    from pipeline.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/smoke.yaml", [
        f"model.name={args.variant}", f"model.image_size={args.image_size}", "model.num_classes=10",
        f"train.micro_batch={args.batch}", f"train.global_batch={args.batch * workers}",
        f"train.steps={args.steps + args.warmup}", f"train.zero.stage={stage}", f"train.precision={precision}",
        "train.schedule.warmup_steps=0", "train.schedule.decay=constant", f"scaling.num_workers={workers}",
        "tracking.sink=stdout",
    ])


def _batch(args, rank: int):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return x, y


# -- Ray + DeepSpeed --------------------------------------------------------------------------------------------
def _ray_deepspeed_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from pipeline.model import build_model
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    torch.set_num_threads(1)
    args = argparse.Namespace(**config["args"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = _cfg(args, 2, "fp32", world)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.train, world, param_groups(model, cfg.train.optim.weight_decay))
    x, y = _batch(args, rank)
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = compute_loss("softmax", engine(x), y)
        engine.backward(loss)
        engine.step()
        # what the real loop adds per step: the global loss (all-reduce) and its finiteness check
        t_loss = loss.detach().double().reshape(1)
        dist.all_reduce(t_loss)
        if not torch.isfinite(t_loss).all():
            raise FloatingPointError(f"non-finite loss at step {step}")
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    import json
    import tempfile

    # Ray Train V2 keeps metrics only with a checkpoint: report a tiny one holding the timing
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"step_s.rank{rank}.json").write_text(json.dumps(statistics.median(times)))
        ray.train.report({"step_s": statistics.median(times)}, checkpoint=ray.train.Checkpoint.from_directory(d))


def ray_deepspeed_steps_per_s(args) -> float:
    from pipeline.launch.trainer import connect_ray

    connect_ray()  # before importing ray.train: a local Ray on 127.0.0.1
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    import tempfile

    trainer = TorchTrainer(
        _ray_deepspeed_worker, train_loop_config={"args": vars(args)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{int(time.time())}", storage_path=tempfile.mkdtemp()),
    )
    result = trainer.fit()
    import json

    with result.checkpoint.as_directory() as d:  # the slowest rank sets the pace
        return 1.0 / max(json.loads(f.read_text()) for f in Path(d).glob("step_s.rank*.json"))


# -- plain DDP --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, args, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.model import build_model
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _cfg(args, 0, "fp32", world)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ddp = DDP(model)
    o = cfg.train.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    x, y = _batch(args, rank)
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = compute_loss("softmax", ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        t_loss = loss.detach().double().reshape(1)
        dist.all_reduce(t_loss)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    out.put((rank, statistics.median(times)))
    dist.destroy_process_group()


def ddp_steps_per_s(args) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return 1.0 / max(t for _, t in res)


# -- ZeRO memory ------------------------------------------------------------------------------------------------
def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - objects that look like tensors but are not inspectable
            continue
        key = st.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _memory_worker(rank: int, world: int, port: int, args, stage: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    from pipeline.model import build_model
    from pipeline.model.flops import param_count
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _cfg(args, stage, "bf16", world).model_copy()
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": args.mem_variant,
                                                                       "image_size": args.mem_image_size}),
                                 "train": cfg.train.model_copy(update={
                                     "micro_batch": 1, "global_batch": world,
                                     "zero": cfg.train.zero.model_copy(update={"bucket_elements": args.bucket})})})
    before = _live_tensor_bytes()
    model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg.train, world, param_groups(model, 0.1))
    del model
    x = torch.randn(1, 3, cfg.model.image_size, cfg.model.image_size, dtype=torch.bfloat16)
    y = torch.zeros(1, dtype=torch.long)
    engine.backward(compute_loss("softmax", engine(x), y))
    engine.step()  # the first step allocates the Adam moments
    loss = compute_loss("softmax", engine(x), y)
    engine.backward(loss)  # second backward: gradients live as well (the formula's steady state)
    del loss
    after = _live_tensor_bytes()
    out.put((rank, after - before, n, param_count(cfg.model)))
    dist.barrier()
    dist.destroy_process_group()


def zero_memory(args, stage: int) -> tuple[float, int]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_memory_worker, args=(r, 2, port, args, stage, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return max(b for _, b, _, _ in res), res[0][2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_nano4")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="micro batch per worker")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating DDP / Ray+DeepSpeed rounds")
    p.add_argument("--mem-variant", default="vit_s16")
    p.add_argument("--mem-image-size", type=int, default=32)
    p.add_argument("--bucket", type=int, default=2_000_000,
                   help="ZeRO communication bucket (elements); DeepSpeed's default 5e8 would dominate small models")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()

    if not args.skip_speed:
        ddp, ours = [], []
        for r in range(args.rounds):  # alternate, so drift on a shared machine hits both
            ddp.append(ddp_steps_per_s(args))
            ours.append(ray_deepspeed_steps_per_s(args))
            print(f"round {r}: DDP {ddp[-1]:.2f} steps/s, Ray+DeepSpeed ZeRO-2 {ours[-1]:.2f} steps/s", flush=True)
        d, o = statistics.median(ddp), statistics.median(ours)
        print(f"\n{args.variant} {args.image_size}px, micro batch {args.batch}, 2 CPU workers, fp32, "
              f"median of {args.rounds} rounds x {args.steps} steps")
        print(f"  plain DDP (torch.distributed, gloo)   {d:8.2f} steps/s  {d * 2 * args.batch:8.1f} img/s")
        print(f"  Ray Train + DeepSpeed ZeRO-2          {o:8.2f} steps/s  {o * 2 * args.batch:8.1f} img/s")
        print(f"  ratio ours/DDP {o / d:.3f}  (overhead {100 * (1 - o / d):+.1f}%; target <= 10%)")

    if not args.skip_memory:
        print(f"\nper-rank model-state memory, {args.mem_variant}, bf16 mixed precision, AdamW, N = 2 ranks")
        print(f"  {'stage':>5} {'measured MB':>12} {'formula MB':>11} {'bytes/param':>12} {'formula':>8}")
        n_ranks = 2
        for stage in (0, 1, 2, 3):
            measured, n = zero_memory(args, stage)
            formula = {0: 16, 1: 4 + 12 / n_ranks, 2: 2 + 14 / n_ranks, 3: 16 / n_ranks}[stage]
            print(f"  {stage:>5} {measured / 2**20:12.1f} {formula * n / 2**20:11.1f} {measured / n:12.2f} "
                  f"{formula:8.2f}", flush=True)
        print("  (parameters: %d; measured = live tensor storage after one step; DeepSpeed keeps extra "
              "communication buffers that the formula leaves out)" % n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
