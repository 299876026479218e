"""Learning-rate schedule: linear warmup from 0 to the peak, then linear or cosine decay (or constant) to
`end_lr_fraction` x peak at the last step (the paper's recipe, Appendix B.1)."""

from __future__ import annotations

import math
from typing import Callable

from pipeline.train.config import ScheduleConfig

__all__ = ["lr_factor", "lr_lambda"]


def lr_factor(step: int, schedule: ScheduleConfig, total_steps: int) -> float:
    """The multiplier of the peak learning rate used for optimizer step `step` (0-based)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = min(schedule.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule.decay == "constant":
        return 1.0
    decay_steps = total_steps - warmup
    progress = min(1.0, (step - warmup) / decay_steps) if decay_steps > 0 else 1.0
    end = schedule.end_lr_fraction
    if schedule.decay == "linear":
        return end + (1.0 - end) * (1.0 - progress)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """`lr_factor` bound to a schedule, in the form `torch.optim.lr_scheduler.LambdaLR` wants."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    schedule = schedule.model_copy()

    # A closure on purpose: LambdaLR's state_dict() skips plain functions, so a resumed run that changed
    # train.steps gets the new horizon instead of the one saved in its checkpoint.
    def factor(step: int) -> float:
        return lr_factor(step, schedule, total_steps)

    return factor
