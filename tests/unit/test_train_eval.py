"""Few-shot linear evaluation (closed-form ridge) and top-1 evaluation."""

from __future__ import annotations

import pytest
import torch

from pipeline.eval.classify import evaluate_classifier, precision_at_1
from pipeline.eval.fewshot import fewshot_accuracy, ridge_classifier, sample_k_per_class


def _blobs(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_ridge_dual_equals_primal():
    x, y = _blobs(2, 3, 50, 1.0, 1)  # 6 samples, 51 dims: the dual (N x N) branch
    w = ridge_classifier(x, y, 3, l2=1e-2)
    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    t = -torch.ones(len(y), 3, dtype=torch.float64)
    t[torch.arange(len(y)), y] = 1
    primal = torch.linalg.solve(xb.T @ xb + 1e-2 * torch.eye(51, dtype=torch.float64), xb.T @ t)
    torch.testing.assert_close(w, primal, rtol=1e-6, atol=1e-8)


def test_fewshot_accuracy_separable_and_random():
    x, y = _blobs(30, 5, 16, 0.3, 2)
    xt, yt = _blobs(20, 5, 16, 0.3, 2)  # same centres (same seed), test draws
    xt = xt + 0.1 * torch.randn_like(xt)
    acc = fewshot_accuracy(x, y, xt, yt, shots=[1, 5, 10], l2=1e-3, seed=0)
    assert set(acc) == {1, 5, 10}
    assert acc[10] == pytest.approx(1.0)
    # features that carry no label information: chance level, far below the separable case
    noise = torch.randn(150, 16, generator=torch.Generator().manual_seed(3))
    chance = fewshot_accuracy(noise, y, torch.randn(100, 16), yt, shots=[10], l2=1e-3, seed=0)
    assert chance[10] < 0.5


def test_sample_k_per_class_is_seeded_and_balanced():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    idx = sample_k_per_class(y, 3, seed=7)
    assert torch.equal(idx, sample_k_per_class(y, 3, seed=7))
    assert torch.bincount(y[idx]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="class 0 has 10 training examples, fewer than k=11"):
        sample_k_per_class(y, 11, seed=0)


def test_precision_at_1_single_and_multi_label():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7]])
    assert int(precision_at_1(logits, torch.tensor([1, 2, 2]))) == 2
    multi = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 1]])
    assert int(precision_at_1(logits, multi)) == 2


def test_evaluate_classifier_sums_valid_samples_only():
    from pipeline.data.transforms import normalize

    model = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (5, 4), dtype=torch.uint8, generator=g),
                "label": torch.randint(0, 3, (5,), generator=g), "valid": torch.tensor([True] * 5)} for _ in range(3)]
    batches[1]["valid"] = torch.tensor([True, True, False, True, False])  # two padding repeats
    out = evaluate_classifier(model, batches, torch.nn.functional.cross_entropy, max_batches=2, num_classes=3)
    assert out["count"] == 8
    x = normalize(torch.cat([b["image"][b["valid"]] for b in batches[:2]]))
    y = torch.cat([b["label"][b["valid"]] for b in batches[:2]])
    with torch.no_grad():
        ref_loss = torch.nn.functional.cross_entropy(model(x), y).item() * 8
        pred = model(x).argmax(1)
    assert out["loss_sum"] == pytest.approx(ref_loss, rel=1e-5)
    assert out["correct"] == (pred == y).sum().item()
    assert out["confusion"].sum() == 8 and out["confusion"].diag().sum() == out["correct"]
    assert torch.equal(out["images"], batches[0]["image"])


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    import numpy as np
    from sklearn.metrics import average_precision_score

    from pipeline.eval.classify import average_precision

    g = torch.Generator().manual_seed(11)
    targets = torch.rand(40, 6, generator=g) < 0.3
    targets[:, 5] = False  # a class without a positive in the split: no AP, left out of the mean
    scores = torch.randn(40, 6, generator=g) + 1.5 * targets
    if ties:
        scores = (scores * 2).round() / 2  # many tied scores: each group of ties is one threshold
    ap_sum, classes = average_precision(scores, targets)
    ref = [average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in range(5)]
    assert classes == 5
    assert ap_sum / classes == pytest.approx(float(np.mean(ref)), abs=1e-12)
    assert average_precision(torch.zeros(0, 3), torch.zeros(0, 3)) == (0.0, 0)
