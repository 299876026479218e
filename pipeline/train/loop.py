"""The per-worker training function. Self-contained: it receives a plain dict (validated config + run identity +
optional init spec / evaluation hooks), builds model, data and DeepSpeed engine itself, and talks to Ray only
through `train_worker` (report + restore). Every rank runs the same control flow: the same steps, evaluations,
checkpoints and reports.

Worker dict (built by `pipeline.launch.trainer.worker_config`):
    config         the resolved config, `model_dump(mode="json")`
    config_class   "module:Class" that validates it (default pipeline.config:RunConfig)
    run_id         MLflow run id (null: none / created by the sink); a checkpoint's run id wins on resume
    init           optional {"checkpoint": dir/URL, "reset_head": bool, "freeze_backbone": bool}
    eval_hooks     optional list of callables (or "module:function") taking an EvalContext, returning metrics
    fault          TEST ONLY fault injection and recording (see `_TestHooks`): {"step", "rank", "marker",
                   "phase"} kills that rank once (the marker file remembers it did); more kills under "kills": [...];
                   "record": a path prefix each rank appends JSON lines to (where it started, each step's sample
                   keys); "step_sleep_s": a pause after every step (to make a tiny run span an outage)

A checkpoint written by another number of workers is resumed through DeepSpeed's universal checkpoint format (the
weights and optimizer state re-partitioned for the new world size); the data loader then restarts the epoch that
was in progress from its beginning with the new sharding (see pipeline.data.loader).
"""

from __future__ import annotations

import importlib
import logging
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["train_worker", "run_training", "EvalContext", "WorkerSpec", "compute_loss", "build_init_model"]

log = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What an evaluation hook gets. Hooks run on every rank at the same steps (collectives allowed); only rank
    0's returned metrics are logged."""

    model: torch.nn.Module
    step: int
    rank: int
    world_size: int
    cfg: Any
    device: torch.device
    dtype: torch.dtype

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return _all_reduce_sum(values, self.device)


@dataclass
class WorkerSpec:
    cfg: Any
    run_id: str | None = None
    init: dict | None = None
    eval_hooks: list[Callable[[EvalContext], Mapping[str, float]]] = field(default_factory=list)
    fault: dict | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WorkerSpec":
        from pipeline.config import validate

        config_cls = _import(d.get("config_class") or "pipeline.config:RunConfig")
        hooks = [_import(h) if isinstance(h, str) else h for h in d.get("eval_hooks") or []]
        return cls(validate(config_cls, d["config"]), d.get("run_id"), d.get("init"), hooks, d.get("fault"))


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    return getattr(importlib.import_module(module), attr)


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
def build_init_model(cfg: Any, init: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The model to train: fresh from cfg.model (seeded), or initialised from a checkpoint in the model's format:
    position embeddings resampled to cfg.model.image_size, optionally a new zero-initialised head for
    cfg.model.num_classes (pre-logits dropped) and a frozen backbone (linear probe)."""
    from pipeline.model import build_model, resample_pos_embed

    torch.manual_seed(cfg.train.seed)
    if not init or not init.get("checkpoint"):
        return build_model(cfg.model)
    from pipeline.model.checkpoint import load_checkpoint

    from pipeline.train.checkpoint import fetch_checkpoint

    with fetch_checkpoint(init["checkpoint"], cfg.storage) as local:
        sd, ckpt_cfg, _ = load_checkpoint(local)
    reset_head = bool(init.get("reset_head"))
    if reset_head:
        # the checkpoint's head/pre-logits shapes, the run's everything else; the head is replaced below
        arch = cfg.model.model_copy(update={"num_classes": ckpt_cfg.num_classes, "pre_logits": ckpt_cfg.pre_logits})
    else:
        arch = cfg.model
    model = build_model(arch)
    if sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.grid, model.num_prefix_tokens)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"init checkpoint {init['checkpoint']} does not fit model {cfg.model.name}: {e}") from None
    if reset_head:
        model.reset_classifier(cfg.model.num_classes, keep_pre_logits=False)
        if cfg.model.head_bias_init and model.head is not None:
            torch.nn.init.constant_(model.head.bias, cfg.model.head_bias_init)
    if init.get("freeze_backbone"):
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


# -- helpers ----------------------------------------------------------------------------------------------------
def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _fewshot_name(cfg: Any, manifest_name: str = "") -> str:
    """fewshot/<name>_<k>shot: the configured name, else the few-shot set's manifest name, else its folder."""
    if cfg.train.fewshot_name:
        return cfg.train.fewshot_name
    if manifest_name:
        return manifest_name
    # .../<dataset>/train/manifest.json -> <dataset>
    parts = [p for p in cfg.data.fewshot_train.split("://")[-1].split("/") if p]
    parts = [p for p in parts if p not in ("manifest.json", "train") and "|" not in p]
    return parts[-1] if parts else "fewshot"


def _grad_norm(engine: Any) -> float | None:
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    return float(g.item() if torch.is_tensor(g) else g)


# -- the loop ---------------------------------------------------------------------------------------------------
def run_training(spec: WorkerSpec, *, rank: int, world_size: int, restore_dir: str | None,
                 report: Callable[[dict, str | None, int], None]) -> dict[str, Any]:
    """Trains `spec.cfg` on this rank. `restore_dir`: a complete training checkpoint to continue from.
    `report(metrics, checkpoint_dir_or_None, step)` is called by every rank at the same steps."""
    from pipeline.data.loader import build_loader
    from pipeline.model.flops import forward_flops
    from pipeline.tracking.sinks import build_sink
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.engine import build_engine, compute_dtype, deepspeed_config, gradient_accumulation
    from pipeline.train.optim import param_groups
    from pipeline.train.throughput import mfu, peak_tflops

    cfg, tr = spec.cfg, spec.cfg.train
    accum = gradient_accumulation(tr, world_size)
    hooks = _TestHooks(spec.fault, rank)
    state: dict[str, Any] = {}
    resharded = False
    if restore_dir is not None:
        state = ckpt.read_train_state(restore_dir, 0)
        resharded = int(state["world_size"]) != world_size
        if resharded:
            log.warning("checkpoint %s was written by %s workers, this run has %d: resuming through a universal "
                        "checkpoint; the data loader restarts the epoch in progress", restore_dir,
                        state["world_size"], world_size)
            state["loader"] = _resharded_loader_state(restore_dir, int(state["world_size"]), rank)
        else:
            state = ckpt.read_train_state(restore_dir, rank)
    run_id = state.get("run_id") or spec.run_id

    # On resume the weights come from the training checkpoint; building from the init spec again keeps the same
    # architecture and frozen set as the first start.
    model = build_init_model(cfg, spec.init)
    engine = build_engine(model, cfg, world_size, param_groups(model, tr.optim.weight_decay),
                          load_universal=resharded)
    device, dtype = engine.device, compute_dtype(tr.precision)
    start_step = 0
    if restore_dir is not None:
        if resharded:
            from pipeline.train.engine import to_universal

            universal = tempfile.mkdtemp(prefix="vitpipe-universal-")
            try:
                engine.load_checkpoint(to_universal(restore_dir, state["tag"], universal), tag=state["tag"])
            finally:
                shutil.rmtree(universal, ignore_errors=True)
        else:
            engine.load_checkpoint(restore_dir, tag=state["tag"])
        start_step = int(state["step"])
    hooks.record({"event": "start", "start_step": start_step, "world_size": world_size, "pid": os.getpid(),
                  "digest": hooks.digest(engine)})

    loader_kw = dict(image_size=cfg.model.image_size, in_chans=cfg.model.in_chans, num_classes=cfg.model.num_classes)
    train_loader = build_loader(cfg.data.train, cfg.data, cfg.storage, batch_size=tr.micro_batch, train=True,
                                rank=rank, world_size=world_size, **loader_kw)
    if state.get("loader") is not None:
        train_loader.load_state_dict(state["loader"])
    batches: Iterator[dict] = train_loader.infinite()

    sink = build_sink(cfg.tracking, rank, run_id=run_id, run_name=cfg.name)
    run_id = sink.run_id or run_id
    if start_step == 0:
        sink.log_params(cfg.model_dump(mode="json"))
        sink.log_dict(deepspeed_config(cfg, world_size), "deepspeed_config.json")

    flops_per_image = 3 * forward_flops(cfg.model)
    peak = peak_tflops(tr.precision, tr.peak_tflops)
    loss_fn = lambda logits, y: compute_loss(tr.loss, logits, y)  # noqa: E731
    last = {"step": start_step, "run_id": run_id}

    def evaluate(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        module = engine.module
        if cfg.data.val and (step % tr.eval_every == 0 or step == tr.steps):
            out.update(_validate(cfg, module, loss_fn, rank, world_size, device, dtype, loader_kw))
        if cfg.data.fewshot_train and tr.fewshot_every and (step % tr.fewshot_every == 0 or step == tr.steps):
            out.update(_fewshot(cfg, module, rank, device, dtype, loader_kw))
        if spec.eval_hooks and (step % tr.eval_every == 0 or step == tr.steps):
            ctx = EvalContext(module, step, rank, world_size, cfg, device, dtype)
            for hook in spec.eval_hooks:
                out.update({k: float(v) for k, v in hook(ctx).items()})
        return out

    def save(step: int, metrics: dict) -> None:
        # metrics up to a checkpoint are as durable as the checkpoint (a restart resumes after it and would
        # not log them again); bounded, so an unreachable tracking server does not stall training
        sink.flush(timeout_s=10.0)
        with tempfile.TemporaryDirectory(prefix="vitpipe-ckpt-") as tmp:
            ckpt.save_train_checkpoint(engine, tmp, step=step, rank=rank, world_size=world_size,
                                       loader_state=train_loader.state_dict(), run_id=run_id,
                                       extra={"model": engine.module.cfg.model_dump(mode="json")},
                                       before_commit=lambda: hooks.kill_at("checkpoint", step))
            report({**metrics, "step": step, "run_id": run_id or ""}, tmp, step)

    window_t = time.perf_counter()
    window_wait = 0.0
    window_steps = 0
    try:
        for step in range(start_step + 1, tr.steps + 1):
            torch.manual_seed(tr.seed * 1_000_003 + step * world_size + rank)  # dropout etc.: resume-exact
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            step_keys: list[str] = []
            for _ in range(accum):
                t = time.perf_counter()
                batch = next(batches)
                window_wait += time.perf_counter() - t
                hooks.kill_at("data", step)
                step_keys.extend(batch["key"])
                x = batch["image"].to(device=device, dtype=dtype, non_blocking=True)
                y = batch["label"].to(device=device, non_blocking=True)
                loss = loss_fn(engine(x), y)
                engine.backward(loss)
                hooks.kill_at("step", step)
                engine.step()
                loss_sum += loss.detach().double()
            loss_global = _all_reduce_sum([float(loss_sum) / accum], device)[0] / world_size
            if not torch.isfinite(torch.tensor(loss_global)):
                raise FloatingPointError(
                    f"non-finite training loss ({loss_global}) at step {step} of run {cfg.name!r}; "
                    "lower train.optim.lr, raise train.schedule.warmup_steps or use precision bf16/fp32"
                )
            window_steps += 1
            hooks.record({"event": "step", "step": step, "keys": step_keys, "loss": loss_global,
                          "digest": hooks.digest(engine)})
            hooks.kill_at("after_step", step)
            hooks.pause()

            metrics: dict[str, float] = {}
            if step % tr.log_every == 0 or step == tr.steps:
                dt = time.perf_counter() - window_t
                counters = train_loader.counters()
                keys = sorted(counters)
                summed = _all_reduce_sum([float(counters[k]) for k in keys], device)
                ips = window_steps * tr.global_batch / dt
                metrics.update({
                    "train/loss": loss_global,
                    "train/lr": float(engine.get_lr()[0]),
                    "perf/images_per_s": ips,
                    "perf/step_time_s": dt / window_steps,
                    "perf/data_wait_fraction": min(1.0, window_wait / dt),
                    **{f"data/{k}": v for k, v in zip(keys, summed)},
                })
                gn = _grad_norm(engine)
                if gn is not None:
                    metrics["train/grad_norm"] = gn
                m = mfu(flops_per_image, ips, peak, world_size)
                if m is not None:
                    metrics["perf/mfu"] = m
            metrics.update(evaluate(step))
            if metrics:
                sink.log_metrics(metrics, step)
            saved = step % tr.checkpoint_every == 0 or step == tr.steps
            if saved:
                save(step, metrics)
            if metrics or saved:  # logging, evaluation and checkpoints stay out of the next throughput window
                window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
            last = {"step": step, "run_id": run_id, **metrics}
    finally:
        sink.close()
        close = getattr(train_loader, "close", None)
        if close:
            close()
    return last


def _resharded_loader_state(restore_dir: str, old_world: int, rank: int) -> dict | None:
    """The loader state a rank of a new world size starts from: rank 0's position (the loader sees the other
    world size and restarts that epoch), with every old rank's counters summed into new rank 0 (others start
    at zero) so the run's totals stay right."""
    from pipeline.train import checkpoint as ckpt

    states = [ckpt.read_train_state(restore_dir, r).get("loader") for r in range(old_world)]
    if states[0] is None:
        return None
    out = dict(states[0])
    names = set().union(*((s or {}).get("counters", {}) for s in states))
    out["counters"] = {k: sum(int((s or {}).get("counters", {}).get(k, 0)) for s in states) if rank == 0 else 0
                       for k in names}
    return out


class _TestHooks:
    """TEST ONLY fault injection and recording, from WorkerSpec.fault (None: every method does nothing).

    A kill `{"step", "rank", "marker", "phase"}` fires once (the marker file, written first, remembers it):
      after_step  (default) os._exit(17) after the step completed, before its logging and checkpoint
      data        SIGKILL after the loader handed out the step's batch (its position already past it), before the
                  forward pass
      step        SIGKILL between the backward pass and the optimizer step
      checkpoint  SIGKILL while the step's checkpoint is written: this rank's DeepSpeed shard files exist, its
                  state file and commit marker do not
    `record`: each rank appends JSON lines to `<record>.rank<R>.jsonl`: {"event": "start", "start_step", ...}
    at every (re)start and {"event": "step", "step", "keys", "loss"} after every step, both with `digest`: sums
    of |weights| and of this rank's |Adam moments| (to check what a restore restored)."""

    def __init__(self, fault: Mapping[str, Any] | None, rank: int):
        fault = dict(fault or {})
        kills = [dict(k) for k in fault.get("kills") or []]
        if "step" in fault:
            kills.append({k: fault[k] for k in ("step", "rank", "marker", "phase") if k in fault})
        self.rank = rank
        self.kills = [k for k in kills if int(k.get("rank", 0)) == rank]
        self.path = Path(f"{fault['record']}.rank{rank}.jsonl") if fault.get("record") else None
        self.sleep_s = float(fault.get("step_sleep_s") or 0.0)
        self.node_ip = fault.get("node_ip")

    def record(self, event: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({**event, "rank": self.rank, "node_ip": self.node_ip, "time": time.time()}) + "\n")

    def digest(self, engine: Any) -> dict[str, float] | None:
        if self.path is None:
            return None
        opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        moments = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        steps = set()
        for st in opt.state.values():
            for k in moments:
                if k in st:
                    moments[k] += float(st[k].double().abs().sum())
            if "step" in st:
                steps.add(float(st["step"]))
        weights = sum(float(p.detach().double().abs().sum()) for p in engine.module.parameters())
        return {"weights": weights, **moments, "adam_steps": sorted(steps), "global_steps": engine.global_steps}

    def pause(self) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def kill_at(self, phase: str, step: int) -> None:
        for k in self.kills:
            if int(k["step"]) != step or k.get("phase", "after_step") != phase:
                continue
            marker = Path(k["marker"])
            if marker.exists():
                continue
            marker.write_text(json.dumps({"rank": self.rank, "step": step, "phase": phase, "pid": os.getpid()}))
            log.warning("TEST fault injection: rank %d killed (%s) at step %d", self.rank, phase, step)
            if phase == "after_step":
                os._exit(17)
            os.kill(os.getpid(), signal.SIGKILL)


def _validate(cfg, module, loss_fn, rank, world_size, device, dtype, loader_kw) -> dict[str, float]:
    from pipeline.data.loader import build_loader
    from pipeline.eval.classify import evaluate_classifier

    loader = build_loader(cfg.data.val, cfg.data, cfg.storage, batch_size=cfg.train.micro_batch, train=False,
                          rank=rank, world_size=world_size, **loader_kw)
    sums = evaluate_classifier(module, loader, loss_fn, cfg.train.eval_batches, dtype, device)
    loss_sum, correct, count = _all_reduce_sum([sums["loss_sum"], sums["correct"], sums["count"]], device)
    if count == 0:
        return {}
    return {"val/loss": loss_sum / count, "val/prec1": correct / count}


def _fewshot(cfg, module, rank, device, dtype, loader_kw) -> dict[str, float]:
    """Every rank extracts the features (under ZeRO-3 the forward pass is collective); rank 0 solves."""
    from pipeline.data.loader import build_loader
    from pipeline.eval.fewshot import extract_features, fewshot_accuracy

    feats, manifest_name = {}, ""
    for split, url in (("train", cfg.data.fewshot_train), ("test", cfg.data.fewshot_test or cfg.data.fewshot_train)):
        loader = build_loader(url, cfg.data, cfg.storage, batch_size=cfg.train.micro_batch, train=False,
                              rank=0, world_size=1, drop_last=False, **loader_kw)
        feats[split] = extract_features(module, loader, dtype, device)
        if split == "train":
            manifest_name = getattr(getattr(loader, "manifest", None), "name", "") or ""
    if rank != 0:
        return {}
    acc = fewshot_accuracy(*feats["train"], *feats["test"], cfg.train.fewshot_shots, cfg.train.fewshot_l2,
                           cfg.train.seed)
    name = _fewshot_name(cfg, manifest_name)
    return {f"fewshot/{name}_{k}shot": v for k, v in acc.items()}


# -- Ray entry point --------------------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """The function every Ray Train worker runs (TorchTrainer's train_loop_per_worker)."""
    import ray.train

    from pipeline.train.checkpoint import fetch_checkpoint, find_latest_complete, is_complete, step_of

    spec = WorkerSpec.from_dict(config)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if spec.fault and spec.fault.get("record"):  # TEST ONLY: which node each rank runs on
        spec.fault = {**spec.fault, "node_ip": ray.util.get_node_ip_address()}

    def report(metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        from pipeline.train.checkpoint import checkpoint_dir_name

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir_name(step) if checkpoint else None)

    # Ray's latest checkpoint is the newest one its controller registered; a group that dies right after a
    # report can lose that registration although the checkpoint is committed in storage. The committed markers
    # in storage are the authority: resume from whichever of the two is newer.
    restored = ray.train.get_checkpoint()
    ray_step = step_of(restored.path) if restored is not None else -1
    stored = find_latest_complete(config["run_url"], spec.cfg.storage) if config.get("run_url") else None
    stored_step = step_of(stored) if stored else -1
    if stored is not None and stored_step > ray_step:
        log.warning("resuming from committed checkpoint %s (Ray's latest: step %d)", stored, ray_step)
        with fetch_checkpoint(stored, spec.cfg.storage) as local:
            run_training(spec, rank=rank, world_size=world_size, restore_dir=local, report=report)
        return
    if restored is None:
        run_training(spec, rank=rank, world_size=world_size, restore_dir=None, report=report)
        return
    with restored.as_directory() as local:
        if is_complete(local):
            run_training(spec, rank=rank, world_size=world_size, restore_dir=local, report=report)
            return
    if stored is None:
        raise ValueError(f"checkpoint {restored.path} is incomplete and storage holds no committed one")
    log.warning("checkpoint %s is incomplete; resuming from %s", restored.path, stored)
    with fetch_checkpoint(stored, spec.cfg.storage) as local:
        run_training(spec, rank=rank, world_size=world_size, restore_dir=local, report=report)
