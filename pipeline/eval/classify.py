"""Top-1 evaluation of a classifier on a held-out split: loss and precision@1 (for multi-label targets: whether
the top prediction is one of the true labels)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["evaluate_classifier", "precision_at_1"]


def precision_at_1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of rows whose top-scoring class is correct (labels: int [B] or multi-hot [B, K])."""
    top = logits.argmax(1)
    if labels.ndim == 2:
        return labels.gather(1, top[:, None]).squeeze(1).gt(0).sum()
    return top.eq(labels).sum()


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    max_batches: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Sums over this process's batches: {"loss_sum", "correct", "count"} (all-reduce them across ranks, then
    loss = loss_sum / count, prec1 = correct / count). `loss_fn` returns the mean loss of a batch."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch["image"].to(device=device, dtype=dtype)
            y = batch["label"].to(device)
            logits = model(x).float()
            n = len(x)
            loss_sum += float(loss_fn(logits, y)) * n
            correct += float(precision_at_1(logits, y))
            count += n
    finally:
        model.train(was_training)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}
