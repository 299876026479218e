"""Evaluation of a classifier on a held-out split: loss and precision@1 (for multi-label targets: whether the top
prediction is one of the true labels) and, for multi-label targets, the mean over classes of the average precision
(the ImageNet-21k / JFT convention, beside precision@1)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import to_model_input
from pipeline.eval.plots import confusion_matrix

__all__ = ["evaluate_classifier", "precision_at_1", "average_precision"]


def precision_at_1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of rows whose top-scoring class is correct (labels: int [B] or multi-hot [B, K])."""
    top = logits.argmax(1)
    if labels.ndim == 2:
        return labels.gather(1, top[:, None]).squeeze(1).gt(0).sum()
    return top.eq(labels).sum()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """(sum over classes of the average precision, number of classes with a positive) of scores [N, K] against
    multi-hot targets [N, K]; mAP = sum / count. Per class exactly scikit-learn's `average_precision_score`:
    sum over distinct score thresholds of (recall step) x precision, tied scores forming one threshold. Classes
    without a positive in the split have no AP and are left out of the mean."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"average_precision: scores {tuple(scores.shape)} and targets {tuple(targets.shape)}")
    if len(scores) == 0:
        return 0.0, 0
    s, order = torch.sort(scores.double(), dim=0, descending=True, stable=True)
    pos = targets.gt(0).gather(0, order).double()
    tp = pos.cumsum(0)
    rank = torch.arange(1, len(s) + 1, dtype=torch.float64)[:, None]
    last = torch.ones_like(s, dtype=torch.bool)  # the last row of each group of tied scores is a threshold
    last[:-1] = s[:-1] != s[1:]
    tp_at = torch.where(last, tp, torch.zeros_like(tp))
    prev = torch.cat([torch.zeros_like(tp[:1]), tp_at.cummax(0).values[:-1]])  # tp at the previous threshold
    npos = tp[-1]
    has = npos > 0
    ap = torch.where(last, (tp - prev) * tp / rank, torch.zeros_like(tp)).sum(0)[has] / npos[has]
    return float(ap.sum()), int(has.sum())


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
    first batch's valid images (uint8, for pictures). For multi-hot labels also "scores" (float32 logits [n, K])
    and "targets" (bool [n, K]) of the valid samples, for the average precision. `loss_fn` returns the mean loss
    of a batch."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.int64)
    images = None
    scores: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
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
            if y.ndim == 2:
                scores.append(logits.cpu())
                targets.append(y.gt(0).cpu())
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss_sum": loss_sum, "correct": correct, "count": count, "images": images}
    if num_classes:
        out["confusion"] = confusion
    if scores:
        out["scores"], out["targets"] = torch.cat(scores), torch.cat(targets)
    return out
