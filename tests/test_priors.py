"""Class proportions of the pool: EM recovers them, predictions move to them, bad input is refused."""

import numpy as np
import pytest

from clipfuse.classify import create_ensemble
from clipfuse.classify.base import l2_normalize, softmax
from clipfuse.classify.priors import adjust_priors, estimate_priors, total_variation


def _skewed_pool(priors, n=20_000, dim=6, spread=1.5, seed=0):
    """Rows of Gaussian classes drawn with ``priors``, and their exact posteriors under a uniform prior."""
    rng = np.random.default_rng(seed)
    C = len(priors)
    means = rng.standard_normal((C, dim)) * spread
    y = rng.choice(C, n, p=priors)
    X = means[y] + rng.standard_normal((n, dim))
    logits = -0.5 * ((X[:, None, :] - means[None]) ** 2).sum(-1)
    return X, y, softmax(logits)


def test_em_recovers_known_skewed_priors_from_calibrated_posteriors():
    truth = np.array([0.55, 0.2, 0.1, 0.07, 0.05, 0.03])
    _, y, P = _skewed_pool(truth)
    est = estimate_priors(P, np.full(6, 1 / 6))
    assert total_variation(est, truth) < 0.02
    # the argmax counts are far off: that is what the EM corrects
    assert total_variation(np.bincount(P.argmax(1), minlength=6), truth) > 2 * total_variation(est, truth)
    # and moving the posteriors to the estimate is the Bayes rule under the pool's prior: more rows right
    assert np.mean(adjust_priors(P, np.full(6, 1 / 6), est).argmax(1) == y) > np.mean(P.argmax(1) == y) + 0.01


def test_em_keeps_a_balanced_pool_balanced_and_honours_weights():
    truth = np.full(5, 0.2)
    _, y, P = _skewed_pool(truth, n=10_000, dim=5, seed=1)
    assert total_variation(estimate_priors(P), truth) < 0.02
    # weight 0 on every row of class 0: the estimate drops it
    est = estimate_priors(P, weights=(y != 0).astype(float))
    assert est[0] < 0.05


def test_adjust_priors_is_bayes_rule():
    P = np.array([[0.5, 0.5], [0.8, 0.2]])
    Q = adjust_priors(P, [0.5, 0.5], [0.75, 0.25])
    np.testing.assert_allclose(Q, [[0.75, 0.25], [12 / 13, 1 / 13]])
    np.testing.assert_allclose(adjust_priors(P, [0.3, 0.7], [0.3, 0.7]), P)


@pytest.mark.parametrize("bad, match", [
    (dict(P=np.array([[0.5, np.nan]])), "NaN"),
    (dict(P=np.array([[-0.1, 1.1]])), "negative"),
    (dict(P=np.ones(3)), "2-d"),
    (dict(train_prior=[0.5, 0.5, 0.0]), "one entry per class"),
    (dict(train_prior=[1.0, -1.0]), "non-negative"),
    (dict(train_prior=[np.nan, 1.0]), "finite"),
    (dict(max_iter=0), "max_iter"),
    (dict(tol=float("nan")), "tol"),
    (dict(tol=-1.0), "tol"),
    (dict(weights=[1.0]), "weights"),
    (dict(weights=[1.0, -1.0]), "weights"),
])
def test_estimate_priors_refuses_bad_input(bad, match):
    kwargs = dict(P=np.array([[0.6, 0.4], [0.3, 0.7]]), train_prior=None)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        estimate_priors(kwargs.pop("P"), **kwargs)


def test_ensemble_estimates_the_pool_priors_and_moves_pool_predictions_only():
    # two well separated classes, 9:1 in the pool, labels 10 each: the estimate finds the skew
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(1800, int), np.ones(200, int)]
    X = l2_normalize((np.where(y[:, None] == 0, 1.0, -1.0) * np.r_[1.0, np.zeros(7)] * 1.2
                      + rng.standard_normal((2000, 8)) * 0.9).astype(np.float32))
    y_semi = np.full(2000, -1)
    for c in (0, 1):
        y_semi[rng.choice(np.flatnonzero(y == c), 10, replace=False)] = c
    ens = create_ensemble(["probe", "propagation"], 2).fit(X, y_semi)
    np.testing.assert_allclose(ens.label_priors_, [0.5, 0.5])
    unl = y_semi < 0
    truth = np.bincount(y[unl]) / unl.sum()
    # the labels say 50:50 (0.40 off); the estimate lands close to 90:10
    assert total_variation(ens.pool_priors_, truth) < 0.1 < 0.4 < total_variation(ens.label_priors_, truth)
    moved, _ = ens.predict_proba(X, fit_rows=np.arange(2000))
    unmoved, _ = ens.predict_proba(X, fit_rows=np.arange(2000), shift=False)
    np.testing.assert_allclose(moved, adjust_priors(unmoved, ens.label_priors_, ens.pool_priors_), atol=1e-5)
    assert moved[:, 0].mean() > unmoved[:, 0].mean()
    # held-out scores are of the labels, at the labels' proportions: the shift does not touch them
    plain = create_ensemble(["probe", "propagation"], 2, pool_priors=False).fit(X, y_semi)
    assert plain.val_scores_ == ens.val_scores_
    np.testing.assert_allclose(plain.predict_proba(X, fit_rows=np.arange(2000))[0], unmoved, atol=1e-6)
