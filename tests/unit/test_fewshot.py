"""The few-shot evaluator: leave-one-out choice of the ridge regulariser, several draws of the shots, and a curve
that does not dip where the support set is as large as the feature width."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.eval.fewshot import (
    L2_GRID,
    fewshot_results,
    loo_predictions,
    ridge_classifier,
    sample_k_per_class,
    select_l2,
)


def _planted(n_per_class: int, classes: int, dim: int, signal_dims: int, seed: int):
    """Features whose class signal lives in a few directions of a wider space, with isotropic noise everywhere:
    what frozen features of a half-trained network look like to a linear probe."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(classes, dim)
    centres[:, :signal_dims] = torch.randn(classes, signal_dims, generator=torch.Generator().manual_seed(1234)) * 1.5
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_loo_closed_form_equals_brute_force():
    x, y = _planted(4, 5, 30, 5, seed=0)  # 20 points, 31 columns with the bias: the n < d side
    x2, y2 = _planted(12, 3, 10, 5, seed=1)  # 36 points, 11 columns: the n > d side
    for feats, labels, k in ((x, y, 5), (x2, y2, 3)):
        grid = (2.0 ** -6, 1.0, 2.0 ** 5)
        closed = loo_predictions(feats, labels, k, grid)
        for g, l2 in enumerate(grid):
            for i in range(len(feats)):
                keep = torch.arange(len(feats)) != i
                w = ridge_classifier(feats[keep], labels[keep], k, l2)
                brute = torch.cat([feats[i].double(), torch.ones(1, dtype=torch.float64)]) @ w
                torch.testing.assert_close(closed[g, i], brute, rtol=1e-7, atol=1e-9)


def test_ridge_classifier_matches_sklearn_ridgeclassifier_at_fixed_l2():
    from sklearn.linear_model import RidgeClassifier

    x, y = _planted(15, 4, 12, 4, seed=2)
    xt, _ = _planted(10, 4, 12, 4, seed=3)
    w = ridge_classifier(x, y, 4, l2=0.7)
    # the bias as an explicit (regularised) column and no separate intercept: the same objective and targets
    ones = np.ones((len(x), 1))
    ref = RidgeClassifier(alpha=0.7, fit_intercept=False).fit(np.concatenate([x.numpy(), ones], 1), y.numpy())
    np.testing.assert_allclose(w.numpy(), ref.coef_.T, rtol=1e-6, atol=1e-9)
    ours = (torch.cat([xt.double(), torch.ones(len(xt), 1, dtype=torch.float64)], 1) @ w).argmax(1)
    theirs = ref.predict(np.concatenate([xt.numpy(), np.ones((len(xt), 1))], 1))
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_select_l2_prefers_strong_regularisation_for_noise_and_weak_for_signal():
    noise = torch.randn(40, 60, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(4).repeat_interleave(10)
    x, y = _planted(10, 4, 8, 8, seed=5)
    assert select_l2(noise, labels, 4) >= 2.0 ** 6  # nothing to fit: shrink (singular values^2 are ~40-100)
    assert select_l2(x * 10, y, 4) < select_l2(noise, labels, 4)
    assert select_l2(x, y, 4) in L2_GRID


def _curve(l2, shots, seeds=5):
    pool, pool_y = _planted(40, 8, 64, 6, seed=6)
    test, test_y = _planted(50, 8, 64, 6, seed=7)
    res = fewshot_results(pool, pool_y, test, test_y, shots, l2=l2, seed=0, seeds=seeds)
    return {k: r.mean for k, r in res.items()}


def test_accuracy_does_not_drop_as_k_grows_across_the_interpolation_point():
    shots = [2, 4, 8, 16, 32]  # 8 classes x k against 65 columns: k = 8 is n ~ d
    chosen = _curve(None, shots)
    print("few-shot curve, l2 by leave-one-out:", {k: round(v, 3) for k, v in chosen.items()})
    for a, b in zip(shots, shots[1:]):
        assert chosen[b] >= chosen[a] - 0.01, chosen
    # The regression this guards: the former fixed l2 = 1e-3 dips at n ~ d (the test above fails for it).
    fixed = _curve(1e-3, shots)
    print("few-shot curve, fixed l2 1e-3:", {k: round(v, 3) for k, v in fixed.items()})
    assert fixed[8] < fixed[4] - 0.05 and fixed[8] < chosen[8] - 0.1, fixed


def test_results_are_the_mean_over_draws_with_their_spread():
    pool, pool_y = _planted(30, 5, 20, 5, seed=8)
    test, test_y = _planted(20, 5, 20, 5, seed=9)
    res = fewshot_results(pool, pool_y, test, test_y, [1, 5], seed=3, seeds=4)
    for k, r in res.items():
        assert len(r.accuracies) == 4 and len(r.l2) == 4 and all(l2 in L2_GRID for l2 in r.l2)
        assert r.mean == pytest.approx(float(np.mean(r.accuracies)))
        assert r.std == pytest.approx(float(np.std(r.accuracies, ddof=1)))
    assert len(set(res[1].accuracies)) > 1  # the draws differ (different shots)
    # each draw is the single-seed result of its own seed: the mean is not a re-weighting
    single = fewshot_results(pool, pool_y, test, test_y, [1], seed=4, seeds=1)
    assert single[1].accuracies[0] == res[1].accuracies[1]
    with pytest.raises(ValueError, match="seeds"):
        fewshot_results(pool, pool_y, test, test_y, [1], seeds=0)


def test_sample_k_per_class_refuses_too_few():
    with pytest.raises(ValueError, match="class 1 has 2"):
        sample_k_per_class(torch.tensor([0, 0, 0, 1, 1]), 3, seed=0)
