"""Class proportions of the unlabeled pool, and predictions moved to them.

A classifier fitted on labels drawn a few per class answers as if every class were as
common as in its labels; a real pool is skewed. :func:`estimate_priors` finds the pool's
proportions by the EM of Saerens, Latinne & Decaestecker (2002, "Adjusting the outputs
of a classifier to new a priori probabilities"): reweight each row's calibrated
probabilities by the ratio of the current estimate to the labels' proportions,
renormalise, average, repeat. :func:`adjust_priors` applies the resulting ratio (Bayes'
rule with the new prior), which moves the argmax of ambiguous rows toward common classes.
"""

from __future__ import annotations

import numpy as np

_FLOOR = 1e-8


def _check_distribution(p, n_classes: int, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (n_classes,):
        raise ValueError(f"{name} must have one entry per class ({n_classes}); got shape {p.shape}.")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero; got {p!r}.")
    return p / p.sum()


def _check_proba(P) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] < 1:
        raise ValueError(f"P must be a 2-d array (n_samples, n_classes); got shape {P.shape}.")
    if not np.all(np.isfinite(P)) or np.any(P < 0):
        raise ValueError("P must hold finite, non-negative probabilities; found NaN, infinite or negative values.")
    return P


def adjust_priors(P, train_prior, new_prior) -> np.ndarray:
    """``P`` (n, C) moved from class proportions ``train_prior`` to ``new_prior``:
    ``p'(c|x) ∝ p(c|x) · new_prior[c] / train_prior[c]``, rows renormalised."""
    P = _check_proba(P)
    C = P.shape[1]
    ratio = _check_distribution(new_prior, C, "new_prior") / np.maximum(
        _check_distribution(train_prior, C, "train_prior"), _FLOOR)
    Q = P * ratio
    s = Q.sum(axis=1, keepdims=True)
    return np.where(s > 0, Q / np.where(s > 0, s, 1.0), P)


def estimate_priors(P, train_prior=None, *, weights=None, max_iter: int = 300, tol: float = 1e-7) -> np.ndarray:
    """The class proportions of the rows behind ``P`` by EM (Saerens et al. 2002).

    Parameters
    ----------
    P : ndarray of shape (n_samples, n_classes)
        Calibrated probabilities of the pool's rows under ``train_prior``.
    train_prior : ndarray of shape (n_classes,), optional
        The class proportions the probabilities were calibrated under (the labels'
        proportions); None: uniform.
    weights : ndarray of shape (n_samples,), optional
        How much each row counts (e.g. 0 for rows judged out of distribution).
    max_iter, tol : EM stops after ``max_iter`` rounds or when no proportion moves by ``tol``.

    Returns
    -------
    ndarray of shape (n_classes,), summing to 1.
    """
    P = _check_proba(P)
    n, C = P.shape
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}.")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}.")
    base = np.full(C, 1.0 / C) if train_prior is None else _check_distribution(train_prior, C, "train_prior")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be {n} finite non-negative numbers, one per row of P.")
    if n == 0 or w.sum() <= 0:
        return base.copy()
    w = w / w.sum()
    P = P / np.maximum(P.sum(axis=1, keepdims=True), _FLOOR)
    base = np.maximum(base, _FLOOR)
    prior = base.copy()
    for _ in range(max_iter):
        Q = P * (prior / base)
        Q /= np.maximum(Q.sum(axis=1, keepdims=True), _FLOOR)
        new = w @ Q
        new /= new.sum()
        done = np.max(np.abs(new - prior)) < tol
        prior = new
        if done:
            break
    return prior


def total_variation(p, q) -> float:
    """Half the L1 distance between two distributions (0: equal, 1: disjoint)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())
