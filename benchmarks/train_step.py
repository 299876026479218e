"""Overhead of our distributed training step, through the real loop: `run_training` under Ray Train + DeepSpeed
ZeRO-2 (the code a job runs: pipeline.launch.driver.fit, loader, counters, stdout sink; checkpoint and evaluation
steps out of the timed range) against plain torch.distributed DDP fed by the same loader (2 processes, gloo, AdamW,
gradient clipping, fp32). Between them, to say where the time goes: the same Ray + DeepSpeed engine in a hand loop
(forward, backward, step; no counters, no sink, no per-step collective), which also times the per-step all-reduce
the real loop makes (loss + stop vote) on its own. Rounds alternate the three, the order rotating each round.
Then the per-rank model-state memory of ZeRO 1/2/3 (bf16 mixed precision, 2 ranks) against the ZeRO paper's
formula (Rajbhandari et al. 2020: 16 bytes/param = 2 fp16 params + 2 fp16 grads + 12 fp32 master+Adam; per rank
stage 1: 4 + 12/N, stage 2: 2 + 14/N, stage 3: 16/N).

    .venv/bin/python benchmarks/train_step.py                      # vit_nano4 32 px, micro 32, 3 rounds
    .venv/bin/python benchmarks/train_step.py --skip-memory --rounds 3
    .venv/bin/python benchmarks/train_step.py --skip-speed          # memory table only

Step time = mean over the steps after the warm-up (rank 0; ranks move in lockstep), logging steps included.
Memory is measured as the bytes of every live tensor storage the rank holds after one optimizer step (found
through the garbage collector, deduplicated by storage), minus what it held before the engine existed, taken after
the second backward pass (gradients and Adam moments both live): the parameters, gradient buffers, fp32 master
weights and Adam moments DeepSpeed keeps in Python-visible tensors, plus its communication buckets (--bucket).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitpipe" / "torch_extensions"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
from common import JpegSource, free_port, make_jpegs  # noqa: E402

from pipeline.train.hooks import TrainHooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cfg(args, stage: int, precision: str, workers: int, data: str | None = None, over: tuple = ()):
    from pipeline.config import load_config

    return load_config(ROOT / "configs/pretrain/smoke.yaml", [
        f"model.name={args.variant}", f"model.image_size={args.image_size}", "model.num_classes=10",
        f"train.micro_batch={args.batch}", f"train.global_batch={args.batch * workers}",
        f"train.steps={args.steps + args.warmup}", f"train.zero.stage={stage}", f"train.precision={precision}",
        "train.schedule.warmup_steps=0", "train.schedule.decay=constant", f"scaling.num_workers={workers}",
        "tracking.sink=stdout", "data.num_workers=1", "data.shuffle_buffer=64",
        f"train.zero.bucket_elements={args.bucket}", *([f"data.train={data}"] if data else []), *over,
    ])


def _mean_step_s(times: list[float], warmup: int) -> float:
    """Mean step time after the warm-up, from the times each step ended."""
    return (times[-1] - times[warmup - 1]) / (len(times) - warmup)


class StepClock(TrainHooks):
    """Rank 0 appends the time each step ends to a file (the loop's own hooks: nothing else added to it)."""

    def __init__(self, path: str):
        self.path = path

    def after_step(self, info, step, loss, keys):
        if info.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{time.perf_counter()}\n")


# -- the real loop: run_training under Ray Train + DeepSpeed -----------------------------------------------------
def ours_step_s(args, data: str) -> float:
    from pipeline.launch.driver import fit
    from pipeline.tracking.sinks import RunRef

    with tempfile.TemporaryDirectory() as d:
        clock = Path(d, "clock.txt")
        cfg = _cfg(args, args.stage, "fp32", 2, data, (f"name=bench-{time.time_ns()}", f"scaling.storage_path={d}/runs",
                                              f"train.log_every={args.log_every}",
                                              f"train.checkpoint_every={10 * args.steps}",
                                              f"train.eval_every={10 * args.steps}"))
        fit(cfg, run=RunRef(sink="stdout"), hooks=StepClock(str(clock)))
        times = [float(x) for x in clock.read_text().split()]
    return _mean_step_s(times, args.warmup)


# -- the same engine in a hand loop -------------------------------------------------------------------------------
def _hand_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from pipeline.data.loader import build_train_loader
    from pipeline.data.storage import Storage
    from pipeline.data.transforms import to_model_input
    from pipeline.model import build_model
    from pipeline.train.engine import build_engine
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    args = argparse.Namespace(**config["args"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = _cfg(args, args.stage, "fp32", world, config["data"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.train, world, param_groups(model, cfg.train.optim.weight_decay))
    loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=args.batch * world,
                                micro_batch=args.batch, image_size=args.image_size, rank=rank, world_size=world,
                                num_classes=10)
    batches = (batch for step in loader.steps() for batch in step)
    ends, reduce_s = [], []
    for _ in range(args.warmup + args.steps):
        batch = next(batches)
        x = to_model_input(batch["image"], engine.device, torch.float32, cfg.data.augment)
        loss = compute_loss("softmax", engine(x), batch["label"])
        engine.backward(loss)
        engine.step()
        ends.append(time.perf_counter())
        # the real loop's per-step collective (loss + stop vote), timed apart and left out of the step
        t = time.perf_counter()
        v = torch.tensor([float(loss.detach()), 0.0], dtype=torch.float64)
        dist.all_reduce(v)
        reduce_s.append(time.perf_counter() - t)
    out = {"step_s": _mean_step_s(_shift(ends, reduce_s), args.warmup),
           "reduce_s": statistics.median(reduce_s[args.warmup:])}
    with tempfile.TemporaryDirectory() as d:  # Ray Train V2 keeps metrics only with a checkpoint
        Path(d, f"hand.rank{rank}.json").write_text(json.dumps(out))
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d))


def _shift(ends: list[float], excluded: list[float]) -> list[float]:
    """Step end times with the time spent in each step's excluded part (after its end) taken out of the later
    steps."""
    out, removed = [], 0.0
    for t, x in zip(ends, excluded):
        out.append(t - removed)
        removed += x
    return out


def hand_step_s(args, data: str) -> dict:
    from pipeline.launch.fanout import connect_ray

    connect_ray()
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory() as d:
        trainer = TorchTrainer(
            _hand_worker, train_loop_config={"args": vars(args), "data": data},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name=f"bench-hand-{time.time_ns()}", storage_path=d),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as c:
            return json.loads(Path(c, "hand.rank0.json").read_text())


# -- plain DDP --------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, args, data: str, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipeline.data.loader import build_train_loader
    from pipeline.data.storage import Storage
    from pipeline.data.transforms import to_model_input
    from pipeline.model import build_model
    from pipeline.train.loop import compute_loss
    from pipeline.train.optim import param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _cfg(args, 0, "fp32", world, data)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ddp = DDP(model)
    o = cfg.train.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=args.batch * world,
                                micro_batch=args.batch, image_size=args.image_size, rank=rank, world_size=world,
                                num_classes=10)
    batches = (batch for step in loader.steps() for batch in step)
    ends = []
    for _ in range(args.warmup + args.steps):
        batch = next(batches)
        x = to_model_input(batch["image"], torch.device("cpu"), torch.float32, cfg.data.augment)
        loss = compute_loss("softmax", ddp(x), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        ends.append(time.perf_counter())
    out.put((rank, _mean_step_s(ends, args.warmup)))
    dist.destroy_process_group()


def ddp_step_s(args, data: str) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, args, data, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    return res[0]


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
    port = free_port()
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
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10, help="run_training's train.log_every")
    p.add_argument("--images", type=int, default=2048, help="JPEGs in the local shards all three read")
    p.add_argument("--rounds", type=int, default=3, help="rotating DDP / hand loop / run_training rounds")
    p.add_argument("--mem-variant", default="vit_s16")
    p.add_argument("--mem-image-size", type=int, default=32)
    p.add_argument("--bucket", type=int, default=2_000_000,
                   help="ZeRO communication bucket (elements); DeepSpeed's default 5e8 would dominate small models")
    p.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage of the Ray + DeepSpeed runs")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()

    if not args.skip_speed:
        from pipeline.data.writer import write_shards

        tmp = tempfile.mkdtemp(prefix="vitpipe-bench-step-")
        data = write_shards(JpegSource(make_jpegs(args.images, (48, 48))), f"{tmp}/ds", samples_per_shard=128,
                            progress=False)
        runs = {"ddp": [], "hand": [], "ours": []}
        steps = [("ddp", lambda: ddp_step_s(args, data)), ("hand", lambda: hand_step_s(args, data)),
                 ("ours", lambda: ours_step_s(args, data))]
        for r in range(args.rounds):  # alternate, so drift on a shared machine hits all three
            for name, fn in steps[r % 3:] + steps[:r % 3]:
                runs[name].append(fn())
            print(f"round {r}: DDP {1e3 * runs['ddp'][-1]:.1f} ms, Ray+DeepSpeed hand loop "
                  f"{1e3 * runs['hand'][-1]['step_s']:.1f} ms, run_training {1e3 * runs['ours'][-1]:.1f} ms per step",
                  flush=True)
        d = statistics.median(runs["ddp"])
        h = statistics.median([x["step_s"] for x in runs["hand"]])
        red = statistics.median([x["reduce_s"] for x in runs["hand"]])
        o = statistics.median(runs["ours"])
        print(f"\n{args.variant} {args.image_size}px, micro batch {args.batch}, 2 CPU workers (gloo), fp32, the same "
              f"loader (1 worker per rank, {args.images} JPEG 48x48 local shards); median of {args.rounds} rounds, "
              f"mean of {args.steps} steps after {args.warmup}")
        print(f"  plain DDP (torch.distributed)                 {1e3 * d:7.1f} ms/step  {2 * args.batch / d:7.1f} img/s")
        print(f"  Ray Train + DeepSpeed ZeRO-{args.stage}, hand loop        {1e3 * h:7.1f} ms/step  {2 * args.batch / h:7.1f} img/s")
        print(f"  Ray Train + DeepSpeed ZeRO-{args.stage}, run_training     {1e3 * o:7.1f} ms/step  {2 * args.batch / o:7.1f} img/s")
        print(f"  ratio run_training / DDP (throughput) = {d / o:.3f}   (overhead {100 * (o / d - 1):+.1f}%; "
              f"target >= 0.95: {'met' if d / o >= 0.95 else 'MISSED'})")
        print("  where the time goes (per step):")
        print(f"    DeepSpeed engine + Ray vs DDP (hand loop - DDP): {1e3 * (h - d):+7.1f} ms  "
              f"(ZeRO-{args.stage} reduce bucket {args.bucket:,} elements)")
        print(f"    the loop's additions (run_training - hand loop): {1e3 * (o - h):+7.1f} ms, of which the per-step "
              f"loss/stop all-reduce {1e3 * red:.2f} ms; the rest: counters' all-reduce and the sink every "
              f"{args.log_every} steps, seeding, hooks")

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
