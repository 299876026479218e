"""Optimizer parameter groups: decoupled weight decay on weight matrices only, never on the model's
`no_weight_decay()` parameters (position embedding, class token), biases or normalisation scales."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups", "decay_split"]


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of trainable parameters (with weight decay, without). Frozen parameters are in neither."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups for the optimizer: {params, weight_decay} and {params, weight_decay: 0}. Empty groups are
    dropped (DeepSpeed's ZeRO refuses them)."""
    decay, no_decay = decay_split(model)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    named = dict(model.named_parameters())
    groups = [
        {"params": [named[n] for n in decay], "weight_decay": weight_decay},
        {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
