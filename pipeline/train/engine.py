"""The DeepSpeed side of training: the DeepSpeed config generated from our typed config, engine construction
and ZeRO-checkpoint consolidation. This is the only module that imports deepspeed (inside functions)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Iterator

import torch

from pipeline.train.config import TrainConfig
from pipeline.train.schedule import lr_lambda

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "gradient_accumulation",
    "deepspeed_config",
    "build_engine",
    "compute_dtype",
    "consolidate_fp32",
    "to_universal",
    "load_universal",
    "full_parameters",
]

# DeepSpeed prints its timers every `steps_per_print` steps; we log our own metrics instead.
_QUIET_STEPS = 10**9


def gradient_accumulation(train: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step so that micro_batch x world_size x accumulation == global_batch."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise ValueError(
            f"train.global_batch ({train.global_batch}) is not divisible by train.micro_batch "
            f"({train.micro_batch}) x {world_size} workers = {per_step}; choose scaling.num_workers dividing "
            f"{train.global_batch // train.micro_batch} or change train.micro_batch"
        )
    return train.global_batch // per_step


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for `train` on `world_size` data-parallel ranks. Generated, never written by
    hand: every value here comes from the typed config (or is a fixed choice explained beside it)."""
    accum = gradient_accumulation(train, world_size)
    opt = train.optim
    if opt.name == "adamw":
        params = {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        # On the device: torch.optim.AdamW instead of DeepSpeed's FusedAdam (a JIT-compiled CUDA op). With the
        # optimizer offloaded, DeepSpeed's DeepSpeedCPUAdam (the cpu_adam op, vectorised) steps the CPU partitions:
        # torch_adam there would silently run torch.optim.AdamW on the CPU, several times slower.
        if not train.zero.offload_optimizer:
            params["torch_adam"] = True
        optimizer = {"type": "AdamW", "params": params}
    else:
        optimizer = {
            "type": "SGD",  # DeepSpeed falls back to torch.optim.SGD for names it does not implement
            "params": {"lr": opt.lr, "momentum": opt.momentum, "weight_decay": opt.weight_decay},
        }
    zero: dict[str, Any] = {"stage": train.zero.stage}
    if train.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train.zero.bucket_elements and train.zero.stage > 0:
        zero["reduce_bucket_size"] = train.zero.bucket_elements
        if train.zero.stage == 3:
            zero["stage3_prefetch_bucket_size"] = train.zero.bucket_elements
        else:
            zero["allgather_bucket_size"] = train.zero.bucket_elements
    if train.zero.stage == 3:
        # the final export consolidates the fp32 shards with zero_to_fp32; no 16-bit gather at save time
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.optim.grad_clip,
        "optimizer": optimizer,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if opt.name == "sgd":
        ds["zero_allow_untested_optimizer"] = True  # torch.optim.SGD under ZeRO: works, DeepSpeed just warns
    return ds


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's weights in (inputs must match)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_engine(model: "nn.Module", train: TrainConfig, world_size: int, params: list[dict] | None = None, *,
                 load_universal: bool = False):
    """`deepspeed.initialize` with the generated config and our warmup/decay schedule (a LambdaLR stepped by
    the engine once per optimizer step). `params`: optimizer parameter groups (default: all trainable).
    `load_universal`: the engine will load a universal checkpoint (`to_universal`), e.g. on another world size."""
    import deepspeed

    ds = deepspeed_config(train, world_size)
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    factor = lr_lambda(train.schedule, train.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
    )
    return engine


@contextlib.contextmanager
def full_parameters(module: "nn.Module") -> Iterator[dict[str, torch.Tensor]]:
    """Inside: {name: full parameter} of `module` on every rank. ZeRO-3 partitions parameters (each rank holds a
    slice); they are gathered for the block (every rank must enter it). Read-only: no forward pass inside."""
    params = dict(module.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        yield params
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        yield params


def consolidate_fp32(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed checkpoint saved by any number of ranks, any ZeRO stage. The fp32
    master weights come from the ZeRO shards (zero_to_fp32); what those lack (stage 0: everything; stage 0/1:
    frozen parameters, which DeepSpeed stores only in the module state) comes from the module state, loaded
    with weights_only=True."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # rank 0's module state: "mp_rank_00_model_states.pt" (stages 0-2) or "zero_pp_rank_0_mp_rank_00_..." (3)
    candidates = [os.path.join(checkpoint_dir, tag, f) for f in
                  ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    states = next((f for f in candidates if os.path.isfile(f)), None)
    if states is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed model states for tag {tag!r} ({candidates[0]})")
    saved = torch.load(states, map_location="cpu", weights_only=True)
    stage = int((saved.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    sd: dict[str, torch.Tensor] = {}
    if stage:
        # zero_to_fp32 narrates each file it reads and draws a progress bar; its errors still raise
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag))
    for name, t in saved["module"].items():
        if name not in sd:
            sd[name] = t
    return {k: v.float().contiguous() for k, v in sd.items()}


def load_universal(engine: Any, checkpoint_dir: str, tag: str) -> None:
    """Loads checkpoint `<checkpoint_dir>/<tag>`, written by any number of ranks, into an engine built with
    `load_universal=True` (another world size): converted to the universal format in a temporary folder, loaded,
    removed.

    Two repairs after DeepSpeed's ZeRO-3 universal load (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`),
    which (1) gives every optimizer parameter group the hyperparameters of the checkpoint's first group, which would
    decay the no-decay group (biases, norms, embeddings): a hyperparameter that differs between the groups is put
    back to what each group was built with; and (2) gives every sub-group's Adam state the same `step` tensor, which
    torch's Adam increments in place once per sub-group, so the second group's bias correction ran a step ahead
    (its weights then drift from an uninterrupted run's by ~8% of a step, tests/integration/test_elastic_resume.py):
    each state gets its own copy."""
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in torch_optimizer.param_groups]
    per_group = {k for k in groups[0] if any(g.get(k) != groups[0][k] for g in groups)}
    universal = tempfile.mkdtemp(prefix="vitpipe-universal-")
    try:
        engine.load_checkpoint(to_universal(checkpoint_dir, tag, universal), tag=tag)
    finally:
        shutil.rmtree(universal, ignore_errors=True)
    for group, before in zip(torch_optimizer.param_groups, groups):
        for k in per_group:
            group[k] = before[k]
    for state in torch_optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(checkpoint_dir: str, tag: str, out_dir: str) -> str:
    """Converts DeepSpeed checkpoint `<checkpoint_dir>/<tag>` (ZeRO shards of any world size) into DeepSpeed's
    universal format at `<out_dir>/<tag>` (one fp32 file per parameter and optimizer moment), which an engine
    built with `load_universal=True` loads on any world size. Returns `out_dir`. Runs in this process (one
    worker, no process pool). Our models carry no `universal_checkpoint_info`; DeepSpeed's
    `--inject_missing_state` adds the version marker (no tensor or pipeline parallelism to describe)."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=os.path.join(checkpoint_dir, tag), output_folder=os.path.join(out_dir, tag),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars and banners
        ds_to_universal.main(args)
    return out_dir
