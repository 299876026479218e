"""The training loop of one rank, and nothing else: model, data, DeepSpeed engine, steps, evaluations and
checkpoints. It reaches Ray only through the `report` callable it is given (pipeline.launch.worker), the tracked
run only through a metrics sink built from `spec.run`, and tests and extensions only through `spec.hooks`.

Every rank runs the same control flow: the same steps, evaluations, checkpoints and reports, and the same stop
decision. An interruption (`interrupt()` on any rank: "stop", e.g. a SIGTERM on the job's driver, or "pause", e.g. a
preempted worker of an elastic group or a resize) is all-reduced with the step's loss; when any rank asked, every
rank finishes the step, writes one committed checkpoint at it and returns `{"stopped": True, "interrupt": ...}`.

Each step's global batch is the same samples whatever the world size (pipeline.data.epochs.ReaderPlan): a
checkpoint written by another number of workers continues at the exact next sample, its weights and optimizer state
re-partitioned through DeepSpeed's universal checkpoint format, with the gradient accumulation that keeps
train.global_batch. Dropout is seeded per (step, rank): with model dropout > 0 only its masks depend on the world.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
import zlib
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F

from pipeline.config import RunConfig
from pipeline.data.loader import build_train_loader, for_rank, merge_states
from pipeline.data.storage import Storage
from pipeline.data.streams import BAD_DATA_NAMES, COUNTER_NAMES, TELEMETRY_NAMES
from pipeline.data.transforms import to_model_input
from pipeline.model import build_model
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.flops import forward_flops
from pipeline.model.weights import check_state_dict
from pipeline.tracking.console import progress_line, say
from pipeline.tracking.sinks import build_sink
from pipeline.train import checkpoint as ckpt
from pipeline.train.ema import ParamEMA
from pipeline.train.engine import build_engine, compute_dtype, gradient_accumulation, load_universal
from pipeline.train.evaluate import Evaluator
from pipeline.train.hooks import LoopInfo, all_reduce_sum
from pipeline.train.optim import param_groups
from pipeline.train.spec import InitSpec, WorkerSpec
from pipeline.train.throughput import mfu, peak_tflops

__all__ = ["run_training", "run_evaluation", "compute_loss", "build_model_for", "batch_digest", "Interrupt"]

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir or None, step, before_marker=None): every rank, at the same steps. It owns
# checkpoint_dir (a local folder holding this rank's committed checkpoint files): it copies the folder into the run's
# storage, this rank's commit marker last (calling `before_marker` first), and removes it, now or in the background
Report = Callable[..., None]
# what a rank asks for at the end of a step: "stop" ends the run (a checkpoint first); "pause" commits a checkpoint
# and hands the group back to its launcher (an elastic group continues on other workers); None trains on
Interrupt = Literal["stop", "pause"] | None


def _never() -> Interrupt:
    return None


def batch_digest(keys: list[str], aug: list[int]) -> int:
    """A fingerprint of a set of samples and their augmentation: the sum of a 32-bit hash per (key, augmentation
    seed). Sums of the ranks' digests are the global batch's, whatever its split (exact in float64 up to 2**21
    samples): equal digests, the same samples augmented the same way."""
    return sum(zlib.crc32(f"{k}:{a}".encode()) for k, a in zip(keys, aug))


# -- losses ---------------------------------------------------------------------------------------------------
def compute_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax: cross-entropy (int labels, or multi-hot turned into a uniform distribution over the positives);
    sigmoid: per-class binary cross-entropy summed over classes, mean over the batch (big_vision's sigmoid_xent)."""
    logits = logits.float()
    if kind == "softmax":
        if labels.ndim == 2:
            target = labels.float() / labels.float().sum(1, keepdim=True).clamp_min(1.0)
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, labels)
    if labels.ndim == 1:
        labels = F.one_hot(labels, logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum") / len(logits)


# -- model ------------------------------------------------------------------------------------------------------
def build_model_for(cfg: RunConfig, init: InitSpec | None = None, *, load_init: bool = True) -> torch.nn.Module:
    """The model to train: fresh from cfg.model (seeded), or with the weights of `init.checkpoint` (shapes must
    equal cfg.model's: the transfer driver adapts them first) and, with `init.freeze_backbone`, only `head.*`
    trainable. `load_init=False` builds the same architecture and frozen set without reading the weights (a
    restore overwrites them anyway)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if init is None:
        return model
    if load_init:
        with Storage(cfg.storage).fetch_dir(init.checkpoint) as local:
            sd, _, _ = load_checkpoint(local)
        try:
            check_state_dict(sd, cfg.model)
        except ValueError as e:
            raise ValueError(f"init checkpoint {init.checkpoint} does not fit the run's model.* (adapt it with "
                             f"pipeline.model.weights.adapt_state_dict): {e}") from None
        model.load_state_dict(sd)
    if init.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def input_telemetry(loader: Any, since: dict[str, int], dt: float, device: torch.device) -> dict[str, float]:
    """The loader's counters summed over ranks (one collective; every rank calls this): data/<bad-data counter>
    totals and what the input pipeline did since `since` (this rank's counters at the window's start, `dt` seconds
    ago): perf/store_mb_per_s (bytes read from storage by all ranks), perf/loader_samples_per_s (what one rank's
    loader can deliver: its workers' samples per second of production time (reading, decoding, augmenting) times
    its workers; compare with perf/images_per_s / world size), data/bytes_per_sample, data/bytes_read."""
    now = loader.counters()
    delta = [float(now[k] - since.get(k, 0)) for k in TELEMETRY_NAMES]
    summed = all_reduce_sum([float(now[k]) for k in COUNTER_NAMES] + delta, device)
    total = dict(zip(COUNTER_NAMES, summed))
    window = dict(zip(TELEMETRY_NAMES, summed[len(COUNTER_NAMES):]))
    out = {f"data/{k}": total[k] for k in BAD_DATA_NAMES}
    out["data/bytes_read"] = total["bytes_read"]
    out["perf/store_mb_per_s"] = window["bytes_read"] / dt / 1e6
    if total["samples"]:
        out["data/bytes_per_sample"] = total["bytes_read"] / total["samples"]
    if window["busy_ms"] > 0:
        per_worker = window["samples"] / (window["busy_ms"] / 1e3)
        out["perf/loader_samples_per_s"] = per_worker * max(1, loader.data.num_workers)
    return out


def _grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


def _restored_state(restore_dir: str, rank: int, world_size: int) -> tuple[dict[str, Any], int]:
    """(this rank's training state, the checkpoint's world size). The loader state is every old rank's merged
    (pipeline.data.loader.merge_states): each new rank takes its own readers' positions from it, at any world size."""
    first = ckpt.read_train_state(restore_dir, 0)
    old_world = int(first["world_size"])
    states = [first] + [ckpt.read_train_state(restore_dir, r) for r in range(1, old_world)]
    state = dict(states[rank] if old_world == world_size else first)
    merged = merge_states([s.get("loader") for s in states])
    if merged is not None and merged.get("version") == 1:  # the world-dependent plan: continued at its step
        merged["step"] = int(state["step"])
    state["loader"] = None if merged is None else for_rank(merged, rank)
    return state, old_world


# -- the loop ---------------------------------------------------------------------------------------------------
def run_training(spec: WorkerSpec, *, rank: int, world_size: int, restore_dir: str | None, report: Report,
                 interrupt: Callable[[], Interrupt] = _never) -> dict[str, Any]:
    """Trains `spec.config` on this rank. `restore_dir`: a complete training checkpoint to continue from.
    `report(metrics, checkpoint_dir_or_None, step, before_marker=...)` is called by every rank at the same steps
    (see `Report`: it takes the checkpoint folder over). `interrupt()` is asked at every step (see `Interrupt`).
    Returns the last step's metrics with "step", "stopped" and, when interrupted, "interrupt"."""
    entered = time.perf_counter()
    cfg, tr, hooks = spec.config, spec.config.train, spec.hooks
    accum = gradient_accumulation(tr, world_size)
    state, old_world = _restored_state(restore_dir, rank, world_size) if restore_dir else ({}, world_size)
    resharded = old_world != world_size

    model = build_model_for(cfg, spec.init, load_init=restore_dir is None)
    engine = build_engine(model, tr, world_size, param_groups(model, tr.optim.weight_decay), load_universal=resharded)
    device, dtype = engine.device, compute_dtype(tr.precision)
    start_step, restore_s = 0, 0.0
    if restore_dir is not None:
        t = time.perf_counter()
        if resharded:
            load_universal(engine, restore_dir, state["tag"])
        else:
            engine.load_checkpoint(restore_dir, tag=state["tag"])
        restore_s = time.perf_counter() - t
        start_step = int(state["step"])
        if resharded and rank == 0:
            log.warning("resuming step %d on %d workers (checkpoint: %d): gradient accumulation %d -> %d, the data "
                        "continues at the exact next sample", start_step, world_size, old_world,
                        gradient_accumulation(tr, old_world), accum)
    ema = ParamEMA(engine.module, tr.ema_decay) if tr.ema_decay else None
    if ema is not None and restore_dir is not None and not ema.load(restore_dir):
        log.warning("checkpoint %s holds no weight average (train.ema_decay was 0 when it was written): the "
                    "average starts from its weights", restore_dir)
    info = LoopInfo(rank, world_size, start_step, engine, cfg)
    hooks.on_start(info)

    train_loader = build_train_loader(cfg.data.train, cfg.data, Storage(cfg.storage), global_batch=tr.global_batch,
                                      micro_batch=tr.micro_batch, rank=rank, world_size=world_size,
                                      image_size=cfg.model.image_size, in_chans=cfg.model.in_chans,
                                      num_classes=cfg.model.num_classes, pin_memory=device.type == "cuda")
    if state.get("loader") is not None:
        loader_state = state["loader"]
        if loader_state.get("version") == 1 and rank == 0:
            log.warning("checkpoint %s predates the elastic data plan: continuing at step %d with the new plan; the "
                        "samples of its epoch in progress may repeat or be skipped once", restore_dir, start_step)
        train_loader.load_state_dict(loader_state)
        if train_loader.step != start_step and not cfg.data.synthetic:
            raise RuntimeError(f"checkpoint {restore_dir}: the loader is at step {train_loader.step}, the training "
                               f"state at step {start_step}")
    steps: Iterator[list[dict]] = train_loader.steps()
    if cfg.data.synthetic:  # one real step's batches, again and again: the step without the input pipeline
        steps = itertools.repeat(next(steps))

    sink = build_sink(spec.run, rank)
    flops_per_image = 3 * forward_flops(cfg.model)
    peak = peak_tflops(tr.precision, tr.peak_tflops)
    loss_fn = lambda logits, y: compute_loss(tr.loss, logits, y)  # noqa: E731
    evaluator = Evaluator(cfg, hooks, rank=rank, world_size=world_size, device=device, dtype=dtype, loss_fn=loss_fn,
                          sink=sink, final=spec.final_eval, ema=ema)
    last: dict[str, Any] = {"step": start_step, "stopped": False}
    if rank == 0 and restore_dir is not None and resharded:  # an event the run's page shows, once per resize
        sink.set_tags({f"scaling.resize.step{start_step:08d}": f"{old_world} -> {world_size} workers "
                       f"(gradient accumulation {gradient_accumulation(tr, old_world)} -> {accum})"})

    def save(step: int, metrics: dict, stopped: bool) -> None:
        # metrics up to a checkpoint are as durable as the checkpoint (a restart resumes after it and would
        # not log them again); bounded, so an unreachable tracking server does not stall training
        sink.flush(timeout_s=10.0)
        tmp = tempfile.mkdtemp(prefix="vitpipe-ckpt-")  # handed to `report`, which uploads and removes it
        try:
            if ema is not None:  # before the commit marker: a committed checkpoint always holds its average
                ema.save(tmp, device)
            ckpt.save_train_checkpoint(engine, tmp, step=step, rank=rank, world_size=world_size,
                                       loader_state=train_loader.state_dict(), run_id=spec.run.run_id,
                                       extra={"model": engine.module.cfg.model_dump(mode="json"),
                                              "config": cfg.model_dump(mode="json")},
                                       before_commit=lambda: hooks.before_commit(info, step))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        report({**metrics, "step": step, "stopped": float(stopped)}, tmp, step,
               before_marker=lambda: hooks.before_upload_commit(info, step))

    window_t = run_t0 = time.perf_counter()
    window_io = train_loader.counters()  # this rank's loader counters at the window's start
    window_wait = 0.0
    window_steps = 0
    try:
        for step in range(start_step + 1, tr.steps + 1):
            torch.manual_seed(tr.seed * 1_000_003 + step * world_size + rank)  # dropout etc.: resume-exact
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            step_keys: list[str] = []
            digest = 0
            t = time.perf_counter()
            micro_batches = next(steps)
            window_wait += time.perf_counter() - t
            for batch in micro_batches:
                hooks.after_batch(info, step, batch["key"])
                step_keys.extend(batch["key"])
                digest += batch_digest(batch["key"], batch["aug"].tolist())
                x = to_model_input(batch["image"], device, dtype, cfg.data.augment)
                y = batch["label"].to(device=device, non_blocking=True)
                loss = loss_fn(engine(x), y)
                engine.backward(loss)
                hooks.after_backward(info, step)
                engine.step()
                loss_sum += loss.detach().double()
            if ema is not None:  # the optimizer stepped once (at the accumulation boundary)
                ema.update()
            # one collective per step carries the loss, the batch digest and every rank's interruption votes
            asked = interrupt()
            loss_total, digest_total, stops, pauses = all_reduce_sum(
                [float(loss_sum) / accum, float(digest), float(asked == "stop"), float(asked == "pause")], device)
            loss_global = loss_total / world_size
            if not torch.isfinite(torch.tensor(loss_global)):
                raise FloatingPointError(
                    f"non-finite training loss ({loss_global}) at step {step} of run {cfg.name!r}; "
                    "lower train.optim.lr, raise train.schedule.warmup_steps or use precision bf16/fp32"
                )
            interrupted: Interrupt = None
            if step < tr.steps:
                interrupted = "stop" if stops > 0 else "pause" if pauses > 0 else None
            stopping = interrupted is not None
            window_steps += 1
            hooks.after_step(info, step, loss_global, step_keys)

            metrics: dict[str, float] = {}
            if step % tr.log_every == 0 or step == tr.steps or stopping:
                dt = time.perf_counter() - window_t
                ips = window_steps * tr.global_batch / dt
                metrics.update({
                    "train/loss": loss_global,
                    "train/lr": float(engine.get_lr()[0]),
                    "perf/images_per_s": ips,
                    "perf/step_time_s": dt / window_steps,
                    "perf/data_wait_fraction": min(1.0, window_wait / dt),
                    "data/batch_digest": digest_total,
                    "scaling/world_size": world_size,
                    **input_telemetry(train_loader, window_io, dt, device),
                })
                gn = _grad_norm(engine)
                if gn is not None:
                    metrics["train/grad_norm"] = gn
                m = mfu(flops_per_image, ips, peak, world_size)
                if m is not None:
                    metrics["perf/mfu"] = m
            if step == start_step + 1:  # where each attempt starts, on how many workers, and what starting cost
                metrics.update({"scaling/world_size": world_size, "scaling/restore_s": restore_s,
                                "scaling/startup_s": time.perf_counter() - entered})
            if not stopping:
                metrics.update(evaluator.run(engine.module, step))
            if rank == 0 and "train/loss" in metrics:  # what a user following the job sees, once per interval
                say(progress_line(step, tr.steps, metrics, time.perf_counter() - run_t0, start_step))
            if metrics:
                sink.log_metrics(metrics, step)
            saved = step % tr.checkpoint_every == 0 or step == tr.steps or stopping
            if saved:
                save(step, metrics, interrupted == "stop")
            if metrics or saved:  # logging, evaluation and checkpoints stay out of the next throughput window
                window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
                window_io = train_loader.counters()
            last = {**metrics, "step": step, "stopped": stopping}
            if stopping:
                last["interrupt"] = interrupted
                log.warning("rank %d: %s requested; stopped after step %d with a committed checkpoint", rank,
                            interrupted, step)
                break
    finally:
        sink.close()
        evaluator.close()
        close = getattr(train_loader, "close", None)
        if close:
            close()
    return last


def run_evaluation(spec: WorkerSpec, *, rank: int, world_size: int, report: Report) -> dict[str, Any]:
    """An evaluation-only job on this rank (`spec.evaluate_only`): the weights of `spec.init` on this worker's
    device in the run's precision, each rank on its share of the splits: `spec.final_eval` on data.val (final/*)
    and `spec.fewshot_eval` (fewshot/<k>shot). Rank 0 logs the metrics to the run; every rank reports them (rank
    0's are the job's). Returns them."""
    cfg = spec.config
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.scaling.use_gpu else torch.device("cpu")
    dtype = compute_dtype(cfg.train.precision)
    model = build_model_for(cfg, spec.init).to(device=device, dtype=dtype)
    sink = build_sink(spec.run, rank)
    evaluator = Evaluator(cfg, spec.hooks, rank=rank, world_size=world_size, device=device, dtype=dtype,
                          loss_fn=lambda logits, y: compute_loss(cfg.train.loss, logits, y), sink=sink,
                          final=spec.final_eval)
    metrics: dict[str, float] = {}
    try:
        if spec.final_eval is not None:
            metrics.update(evaluator.final(model, 0))
        if spec.fewshot_eval is not None:
            metrics.update(evaluator.fewshot_only(model, spec.fewshot_eval))
        sink.log_metrics(metrics, 0)
    finally:
        sink.close()
        evaluator.close()
    report({**metrics, "step": 0, "stopped": 0.0}, None, 0)
    return metrics
