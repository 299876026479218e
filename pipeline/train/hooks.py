"""The training loop's hooks: one typed object with no-op methods, called by every rank at the same points of
the loop. Extra evaluations plug in through `evaluate`; tests pass their fault injectors and recorders in the
same way (tests/fixtures/hooks.py). A hooks object is pickled into every worker, so it must be picklable and
should carry only small state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = ["TrainHooks", "LoopInfo", "EvalContext", "all_reduce_sum"]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums `values` over the ranks (float64); the identity when not distributed."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@dataclass
class LoopInfo:
    """This rank's view of the run, handed to every hook."""

    rank: int
    world_size: int
    start_step: int  # 0, or the step of the checkpoint this process restored
    engine: Any  # the DeepSpeed engine: read it (weights, optimizer state), never step it
    config: "RunConfig"


@dataclass
class EvalContext:
    """What `TrainHooks.evaluate` gets. It runs on every rank at the same steps (collectives allowed); only rank 0's
    returned metrics are logged."""

    model: torch.nn.Module
    step: int
    rank: int
    world_size: int
    config: "RunConfig"
    device: torch.device
    dtype: torch.dtype

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self.device)


class TrainHooks:
    """No-op defaults; subclass and override what you need."""

    def on_start(self, info: LoopInfo) -> None:
        """After the engine is built and any checkpoint restored, before the first step."""

    def after_batch(self, info: LoopInfo, step: int, keys: list[str]) -> None:
        """The loader handed out a micro-batch of `step` (its position is past it); before the forward pass."""

    def after_backward(self, info: LoopInfo, step: int) -> None:
        """Between a micro-batch's backward pass and the optimizer step."""

    def after_step(self, info: LoopInfo, step: int, loss: float, keys: list[str]) -> None:
        """`step` completed (`loss`: mean over ranks; `keys`: this rank's samples), before logging and checkpoint."""

    def before_commit(self, info: LoopInfo, step: int) -> None:
        """This rank's checkpoint shard for `step` is written; its state file and commit marker are not yet."""

    def before_upload_commit(self, info: LoopInfo, step: int) -> None:
        """This rank's checkpoint files for `step` are in storage, its commit marker is not yet. With background
        uploads (Ray jobs) this runs on the upload thread while training goes on with the next steps."""

    def evaluate(self, ctx: EvalContext) -> Mapping[str, float]:
        """Extra metrics at every evaluation step (train.eval_every and the last step)."""
        return {}
