"""Top-1 evaluation of a classifier on a held-out split: loss and precision@1 (for multi-label targets: whether
the top prediction is one of the true labels)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import to_model_input
from pipeline.eval.plots import confusion_matrix

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
    augment: AugmentConfig | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Sums over this process's batches, valid samples only (a split's padding repeats are masked):
    {"loss_sum", "correct", "count"} (all-reduce them across ranks, then loss = loss_sum / count, prec1 =
    correct / count), with `num_classes` also "confusion" (int64 [K, K], true x predicted), and "images": the
    first batch's valid images (uint8, for pictures). `loss_fn` returns the mean loss of a batch."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.int64)
    images = None
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            valid = batch["valid"]
            logits = model(to_model_input(batch["image"], device, dtype, augment)).float()[valid.to(device)]
            y = batch["label"][valid].to(device)
            n = int(valid.sum())
            if images is None:
                images = batch["image"][valid]
            if n == 0:
                continue
            loss_sum += float(loss_fn(logits, y)) * n
            correct += float(precision_at_1(logits, y))
            count += n
            if num_classes and y.ndim == 1:
                confusion += confusion_matrix(y.cpu(), logits.argmax(1).cpu(), num_classes)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss_sum": loss_sum, "correct": correct, "count": count, "images": images}
    if num_classes:
        out["confusion"] = confusion
    return out
