"""Heads that are linear in the embedding: CLIP zero-shot and the linear probe."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.utils.validation import check_is_fitted, validate_data

from clipfuse.classify.base import (
    fit_temperature,
    l2_normalize,
    one_hot,
    register_head,
    softmax,
    validate_semi_supervised,
)

PROBE_C_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)


class HeadUnavailableError(ValueError):
    """A head cannot run on these inputs (e.g. zero-shot without class text embeddings)."""


def check_class_embeddings(estimator, class_embeddings, n_features: int) -> np.ndarray:
    """Unit-length class text embeddings of shape (n_classes, n_features), or a clear error."""
    if class_embeddings is None:
        raise HeadUnavailableError(
            f"{type(estimator).__name__} needs class_embeddings (one text embedding per class); "
            "none were given, e.g. because the embedding version has no text tower."
        )
    T = np.asarray(class_embeddings, dtype=np.float32)
    if T.ndim != 2 or T.shape[1] != n_features:
        raise ValueError(
            f"class_embeddings must have shape (n_classes, {n_features}) to match X; got {T.shape}. "
            "Build them with the model that embedded X."
        )
    return l2_normalize(T)


def _labeled_in_range(estimator, y: np.ndarray, n_classes: int) -> None:
    bad = y[(y != -1) & ((y < 0) | (y >= n_classes))]
    if len(bad):
        raise ValueError(
            f"{type(estimator).__name__}: labels must index the {n_classes} class embeddings "
            f"(0..{n_classes - 1}); got {int(bad[0])}."
        )


@register_head("zero-shot")
class ZeroShotHead(ClassifierMixin, BaseEstimator):
    """CLIP zero-shot: cosine similarity to each class's averaged prompt embedding.

    Class ``j`` is row ``j`` of ``class_embeddings`` (the mean of the text embeddings of
    its prompts, built by ``clipfuse.embed``); labels in ``y`` are only used to fit the
    softmax temperature, so the head works with no labels at all.

    Parameters
    ----------
    class_embeddings : array-like of shape (n_classes, n_features)
        Text embedding of each class.
    temperature : float or "auto", default="auto"
        Scale of the cosine logits; ``"auto"`` minimises the NLL of the labeled rows
        (CLIP's own scale, 100, when there are none).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        ``arange(n_classes)``.
    scale_ : float
        The logit scale used.
    """

    def __init__(self, class_embeddings=None, temperature="auto"):
        self.class_embeddings = class_embeddings
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], reset=True)
        T = check_class_embeddings(self, self.class_embeddings, X.shape[1])
        y = np.asarray(y).astype(np.int64)
        _labeled_in_range(self, y, len(T))
        self.classes_ = np.arange(len(T))
        self.text_embeddings_ = T
        labeled = y != -1
        if self.temperature == "auto":
            logits = l2_normalize(X[labeled]) @ T.T
            self.scale_ = fit_temperature(logits, y[labeled]) if labeled.any() else 100.0
        else:
            self.scale_ = float(self.temperature)
        return self

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.scale_ * (l2_normalize(X).astype(np.float64) @ self.text_embeddings_.T.astype(np.float64))

    def predict_proba(self, X):
        """Softmax of the scaled cosine logits, shape (n_samples, n_classes)."""
        return softmax(self._logits(X).astype(np.float64))

    def predict(self, X):
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]


def _multinomial_loss(params, X, Y, W0, b0_shape, reg):
    """Summed cross-entropy of softmax(X Wᵀ + b) plus ``reg/2 * ||W - W0||²``, and its gradient."""
    n_classes, dim = W0.shape
    W = params[: n_classes * dim].reshape(n_classes, dim)
    b = params[n_classes * dim:]
    Z = X @ W.T + b
    Z -= Z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(Z).sum(axis=1, keepdims=True))
    logP = Z - logsum
    loss = -np.sum(Y * logP) + 0.5 * reg * np.sum((W - W0) ** 2)
    G = np.exp(logP) - Y
    grad_W = G.T @ X + reg * (W - W0)
    return loss, np.concatenate([grad_W.ravel(), G.sum(axis=0)])


@register_head("probe")
class LinearProbeHead(ClassifierMixin, BaseEstimator):
    """Logistic regression on the frozen embeddings (the "frozen backbone + FC" baseline).

    Uses the labeled rows only. With ``class_embeddings`` and ``zero_shot_prior=True`` the
    weights start at the zero-shot classifier and the L2 penalty pulls them toward it
    instead of toward zero, so a handful of labels refines the text classifier rather
    than replacing it.

    Parameters
    ----------
    C : float or "auto", default="auto"
        Inverse regularisation strength; ``"auto"`` picks from ``PROBE_C_GRID`` by
        stratified 3-fold cross-validation on the labeled rows (1.0 when a class has
        fewer than 3 labels).
    class_embeddings : array-like of shape (n_classes, n_features), default=None
        Zero-shot class embeddings for the prior.
    zero_shot_prior : bool, default=False
        Regularise toward (and start from) the scaled zero-shot weights.
    max_iter : int, default=1000
        Optimiser iterations.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (n_classes, n_features)
    intercept_ : ndarray of shape (n_classes,)
    C_ : float
        The regularisation used.
    n_iter_ : int
        Optimiser iterations of the final fit.
    """

    def __init__(self, C="auto", class_embeddings=None, zero_shot_prior=False, max_iter=1000):
        self.C = C
        self.class_embeddings = class_embeddings
        self.zero_shot_prior = zero_shot_prior
        self.max_iter = max_iter

    def _select_C(self, X, y_index) -> float:
        if self.C != "auto":
            return float(self.C)
        counts = np.bincount(y_index)
        if len(counts) < 2 or counts.min() < 3:
            return 1.0
        cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
        scores = [cross_val_score(LogisticRegression(C=c, max_iter=self.max_iter), X, y_index,
                                  cv=cv).mean() for c in PROBE_C_GRID]
        return float(PROBE_C_GRID[int(np.argmax(scores))])

    def fit(self, X, y):
        X, y, y_index = validate_semi_supervised(self, X, y)
        labeled = y_index >= 0
        Xl, yl = l2_normalize(X[labeled]).astype(np.float64), y_index[labeled]
        n_classes = len(self.classes_)
        self.C_ = self._select_C(Xl, yl) if n_classes > 1 else 1.0
        if self.zero_shot_prior:
            T = check_class_embeddings(self, self.class_embeddings, X.shape[1])
            _labeled_in_range(self, y, len(T))
            T = T[self.classes_].astype(np.float64)
            scale = fit_temperature(Xl @ T.T, yl)
            W0 = scale * T
            Y = one_hot(yl, n_classes).astype(np.float64)
            x0 = np.concatenate([W0.ravel(), np.zeros(n_classes)])
            res = minimize(_multinomial_loss, x0, args=(Xl, Y, W0, n_classes, 1.0 / self.C_),
                           jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
            self.coef_ = res.x[: W0.size].reshape(W0.shape).astype(np.float32)
            self.intercept_ = res.x[W0.size:].astype(np.float32)
            self.n_iter_ = int(res.nit)
        elif n_classes == 1:
            self.coef_ = np.zeros((1, X.shape[1]), dtype=np.float32)
            self.intercept_ = np.zeros(1, dtype=np.float32)
            self.n_iter_ = 0
        else:
            lr = LogisticRegression(C=self.C_, max_iter=self.max_iter).fit(Xl, yl)
            coef, intercept = lr.coef_, lr.intercept_
            if n_classes == 2:  # sklearn keeps one row for binary problems
                coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
            self.coef_ = coef.astype(np.float32)
            self.intercept_ = intercept.astype(np.float32)
            self.n_iter_ = int(np.max(lr.n_iter_))
        return self

    def _logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return l2_normalize(X).astype(np.float64) @ self.coef_.T.astype(np.float64) + self.intercept_

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes)."""
        return softmax(self._logits(X).astype(np.float64))

    def predict(self, X):
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]
