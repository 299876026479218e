"""Few-shot linear evaluation (paper Sec. 4.1): frozen features of k images per class, a ridge regression to
{-1, 1} one-hot targets solved in closed form, accuracy on held-out images. A cheap proxy of transfer quality
that runs during pretraining."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import to_model_input

__all__ = ["fewshot_accuracy", "sample_k_per_class", "ridge_classifier", "extract_features"]


def sample_k_per_class(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of k examples of every class present (seeded). Raises if some class has fewer than k."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < k:
            raise ValueError(f"few-shot: class {c} has {len(idx)} training examples, fewer than k={k}")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picked)


def ridge_classifier(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    """Weights W [D+1, K] minimising |[X 1] W - Y|^2 + l2 |W|^2 with Y in {-1, 1}^K (the bias is the ones column)."""
    x = torch.cat([feats.double(), torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    y = -torch.ones(len(labels), num_classes, dtype=torch.float64)
    y[torch.arange(len(labels)), labels] = 1.0
    d = x.shape[1]
    # Solve in the smaller of the two spaces: primal (D x D) or dual (N x N); same minimiser.
    if len(x) < d:
        alpha = torch.linalg.solve(x @ x.T + l2 * torch.eye(len(x), dtype=torch.float64), y)
        return x.T @ alpha
    return torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=torch.float64), x.T @ y)


def fewshot_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int],
    l2: float,
    seed: int = 0,
) -> dict[int, float]:
    """k-shot accuracy for each k in `shots` (classes = those in the training labels)."""
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("few-shot: features and labels differ in length")
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    # Standardise with the training pool's statistics: the closed form is then well conditioned whatever the
    # feature scale (tanh pre-logits vs. raw tokens).
    mean = train_feats.double().mean(0, keepdim=True)
    std = train_feats.double().std(0, keepdim=True).clamp_min(1e-6)
    tr = (train_feats.double() - mean) / std
    te = (test_feats.double() - mean) / std
    te1 = torch.cat([te, torch.ones(len(te), 1, dtype=torch.float64)], dim=1)
    out = {}
    for k in shots:
        idx = sample_k_per_class(train_labels, k, seed)
        w = ridge_classifier(tr[idx], train_labels[idx], num_classes, l2)
        pred = (te1 @ w).argmax(1)
        out[int(k)] = float((pred == test_labels).double().mean())
    return out


@torch.no_grad()
def extract_features(model: torch.nn.Module, batches: Iterable[dict], dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", augment: AugmentConfig | None = None,
                     max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`model.forward_features` over the batches ({"image", "label", "valid", "index"}) in eval mode; returns the
    valid samples' (features float32 [N, D], labels [N], manifest index [N]), on the CPU. Every batch is run, the
    padding ones too (under ZeRO-3 the forward pass is collective: every rank runs as many)."""
    was_training = model.training
    model.eval()
    feats, labels, index = [], [], []
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            valid = batch["valid"]
            f = model.forward_features(to_model_input(batch["image"], device, dtype, augment)).float().cpu()
            label = batch["label"]
            feats.append(f[valid])
            labels.append((label.argmax(1) if label.ndim == 2 else label)[valid])
            index.append(batch["index"][valid])
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("few-shot: the feature set is empty")
    return torch.cat(feats), torch.cat(labels).long(), torch.cat(index)
