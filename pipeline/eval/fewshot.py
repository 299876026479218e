"""Few-shot linear evaluation (paper Sec. 4.1): frozen features of k images per class, a ridge regression to
{-1, 1} one-hot targets solved in closed form, accuracy on held-out images. A cheap proxy of transfer quality
that runs during pretraining.

The ridge regulariser is chosen per k, and per draw of the shots, by leave-one-out on the k-shot support set
itself, from a log grid 2^-10 ... 2^15: one SVD of the support features gives every point's leave-one-out
prediction for every candidate in closed form (PRESS: e_i = r_i / (1 - H_ii)). The support set and not a held-out
part of the pool, because a k-shot result may use only k labels per class: tuning on more labelled pool images
would report a (k + extra)-shot number. The criterion is the leave-one-out squared error (as in scikit-learn's
RidgeCV): unlike leave-one-out accuracy it is defined at k = 1, where leaving the one example out leaves its class
without support. A fixed regulariser is wrong at some k: at k x classes ~ feature width the least-squares fit
interpolates and accuracy dips (Fashion-MNIST, ViT nano, l2 1e-3: 10-shot 52% between 5-shot 65% and 25-shot 70%).

Each k is the mean over `seeds` draws of the shots; the spread (std over draws) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from pipeline.data.config import AugmentConfig
from pipeline.data.transforms import to_model_input

__all__ = ["FewshotResult", "L2_GRID", "fewshot_accuracy", "fewshot_results", "sample_k_per_class",
           "ridge_classifier", "ridge_probe", "loo_predictions", "select_l2", "extract_features"]

L2_GRID: tuple[float, ...] = tuple(2.0 ** e for e in range(-10, 16))


@dataclass(frozen=True)
class FewshotResult:
    """One k: accuracy per draw of the shots, the regulariser each draw chose."""

    k: int
    accuracies: tuple[float, ...]
    l2: tuple[float, ...]

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        if len(self.accuracies) < 2:
            return 0.0
        return float(torch.tensor(self.accuracies, dtype=torch.float64).std())


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


def _design(feats: torch.Tensor) -> torch.Tensor:
    return torch.cat([feats.double(), torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)


def _targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    y = -torch.ones(len(labels), num_classes, dtype=torch.float64)
    y[torch.arange(len(labels)), labels] = 1.0
    return y


def ridge_classifier(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> torch.Tensor:
    """Weights W [D+1, K] minimising |[X 1] W - Y|^2 + l2 |W|^2 with Y in {-1, 1}^K (the bias is the ones column)."""
    x, y = _design(feats), _targets(labels, num_classes)
    d = x.shape[1]
    # Solve in the smaller of the two spaces: primal (D x D) or dual (N x N); same minimiser.
    if len(x) < d:
        alpha = torch.linalg.solve(x @ x.T + l2 * torch.eye(len(x), dtype=torch.float64), y)
        return x.T @ alpha
    return torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=torch.float64), x.T @ y)


def loo_predictions(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    grid: Sequence[float] = L2_GRID) -> torch.Tensor:
    """Leave-one-out predictions [len(grid), N, K] of `ridge_classifier` for every l2 in `grid`: row i is what the
    fit on the other N-1 points predicts for point i. With X = U S V^T the hat matrix is
    H = U diag(s^2 / (s^2 + l2)) U^T, and y_i - e_i with e_i = (y_i - (HY)_i) / (1 - H_ii) is the left-out fit."""
    x, y = _design(feats), _targets(labels, num_classes)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    s2 = s.square()
    out = []
    for l2 in grid:
        f = s2 / (s2 + l2)
        fitted = u @ (f[:, None] * uty)
        h = (u.square() * f).sum(1, keepdim=True)
        out.append(y - (y - fitted) / (1.0 - h).clamp_min(1e-12))
    return torch.stack(out)


def select_l2(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
              grid: Sequence[float] = L2_GRID) -> float:
    """The l2 of `grid` with the smallest leave-one-out squared error on (feats, labels); ties go to the larger
    (the smoother fit)."""
    y = _targets(labels, num_classes)
    press = (loo_predictions(feats, labels, num_classes, grid) - y).square().sum((1, 2))
    best = float(press.min())
    return max(l2 for l2, e in zip(grid, press.tolist()) if e <= best * (1 + 1e-9))


@dataclass(frozen=True)
class _Task:
    """A labelled pool and a test set, features standardised with the pool's statistics (its images, not its
    labels): the closed form is then well conditioned and the l2 grid means the same whatever the feature scale
    (tanh pre-logits vs. tokens)."""

    train_x: torch.Tensor  # float64 [N, D], standardised
    train_y: torch.Tensor  # int64 [N]
    test_x1: torch.Tensor  # float64 [M, D + 1], standardised, with the bias column
    test_y: torch.Tensor
    num_classes: int

    @classmethod
    def of(cls, train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
           test_labels: torch.Tensor) -> "_Task":
        if train_feats.ndim != 2 or test_feats.ndim != 2:
            raise ValueError(f"features must be [N, D], got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
        if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
            raise ValueError("few-shot: features and labels differ in length")
        train_y, test_y = train_labels.long(), test_labels.long()
        mean = train_feats.double().mean(0, keepdim=True)
        std = train_feats.double().std(0, keepdim=True).clamp_min(1e-6)
        return cls((train_feats.double() - mean) / std, train_y, _design((test_feats.double() - mean) / std), test_y,
                   int(max(train_y.max(), test_y.max())) + 1)

    def solve(self, idx: torch.Tensor, l2: float | None, grid: Sequence[float]) -> tuple[float, float]:
        """(test accuracy, l2) of the ridge classifier on the pool samples `idx`; l2 None = by leave-one-out."""
        x, y = self.train_x[idx], self.train_y[idx]
        reg = l2 if l2 is not None else select_l2(x, y, self.num_classes, grid)
        w = ridge_classifier(x, y, self.num_classes, reg)
        return float(((self.test_x1 @ w).argmax(1) == self.test_y).double().mean()), float(reg)


def fewshot_results(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int],
    l2: float | None = None,
    seed: int = 0,
    seeds: int = 3,
    grid: Sequence[float] = L2_GRID,
) -> dict[int, FewshotResult]:
    """k-shot accuracy for each k in `shots` over `seeds` draws of the shots (classes = those in the training
    labels). `l2`: a fixed regulariser; None = chosen per draw by leave-one-out on the support set from `grid`."""
    if seeds < 1:
        raise ValueError(f"few-shot: seeds must be >= 1, got {seeds}")
    task = _Task.of(train_feats, train_labels, test_feats, test_labels)
    out = {}
    for k in shots:
        accs, chosen = [], []
        for s in range(seeds):
            acc, reg = task.solve(sample_k_per_class(task.train_y, k, seed + s), l2, grid)
            accs.append(acc)
            chosen.append(reg)
        out[int(k)] = FewshotResult(int(k), tuple(accs), tuple(chosen))
    return out


def ridge_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                test_labels: torch.Tensor, grid: Sequence[float] = L2_GRID) -> tuple[float, float]:
    """(test accuracy, l2) of a ridge classifier on every training sample, features standardised as for the
    few-shot solve and the regulariser chosen by leave-one-out: a frozen-feature linear probe in closed form."""
    task = _Task.of(train_feats, train_labels, test_feats, test_labels)
    return task.solve(torch.arange(len(task.train_y)), None, grid)


def fewshot_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    shots: Sequence[int],
    l2: float | None = None,
    seed: int = 0,
    seeds: int = 1,
) -> dict[int, float]:
    """Mean k-shot accuracy for each k in `shots` (see fewshot_results)."""
    res = fewshot_results(train_feats, train_labels, test_feats, test_labels, shots, l2, seed, seeds)
    return {k: r.mean for k, r in res.items()}


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
