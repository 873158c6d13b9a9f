"""Heads that vote with nearby embeddings: the Tip-Adapter kNN cache and k-means cluster voting."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from clipfuse.classify.base import (
    array_digest,
    fit_temperature,
    l2_normalize,
    normalize_rows,
    one_hot,
    register_head,
    softmax,
    validate_rows,
    validate_semi_supervised,
)
from clipfuse.classify.graph import cluster_rows
from clipfuse.classify.linear import _labeled_in_range, check_class_embeddings

BETA_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 25.0)
BLEND_GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)


@register_head("knn")
class KnnCacheHead(ClassifierMixin, BaseEstimator):
    """Tip-Adapter's training-free cache: affinity to every labeled embedding.

    The labeled rows form a key/value cache. A query's class scores are
    ``sum_i exp(-beta * (1 - cos(x, key_i)) / d) * onehot(label_i)``, normalised by class
    size, where ``d`` is the mean cosine distance between labeled rows, and, when ``class_embeddings`` are given, added to the zero-shot logits with
    weight ``blend``. ``beta`` and ``blend`` are tuned by leave-one-out accuracy on the
    cache itself (each labeled row queried without its own entry), so no label is spent
    on a separate validation set; a temperature fitted on the same scores makes the
    probabilities calibrated.

    Parameters
    ----------
    class_embeddings : array-like of shape (n_classes, n_features), default=None
        Zero-shot class embeddings; without them the head is a pure soft-kNN.
    beta : float or "auto", default="auto"
        Sharpness of the affinity; ``"auto"`` searches ``BETA_GRID``.
    blend : float or "auto", default="auto"
        Weight of the cache relative to the zero-shot logits; ``"auto"`` searches
        ``BLEND_GRID`` (ignored without class embeddings).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    keys_ : ndarray of shape (n_labeled, n_features)
    values_ : ndarray of shape (n_labeled, n_classes)
    beta_, blend_, scale_ : float
    distance_scale_ : float
        Mean cosine distance between labeled rows (the unit of ``beta``).
    """

    def __init__(self, class_embeddings=None, beta="auto", blend="auto"):
        self.class_embeddings = class_embeddings
        self.beta = beta
        self.blend = blend

    def _scores(self, S: np.ndarray, zs: np.ndarray | None, beta: float, blend: float) -> np.ndarray:
        cache = np.exp(-beta * (1.0 - S) / self.distance_scale_) @ self.values_
        cache /= np.maximum(cache.sum(axis=1, keepdims=True), 1e-12)
        return cache if zs is None else blend * cache + zs

    def fit(self, X, y):
        X, y, y_index = validate_semi_supervised(self, X, y)
        X = l2_normalize(X)
        labeled = y_index >= 0
        self.keys_ = X[labeled]
        yl = y_index[labeled]
        counts = np.bincount(yl, minlength=len(self.classes_)).astype(np.float32)
        self.values_ = one_hot(yl, len(self.classes_)) / counts
        zs = None
        if self.class_embeddings is not None:
            T = check_class_embeddings(self, self.class_embeddings, X.shape[1])
            _labeled_in_range(self, y, len(T))
            self.text_embeddings_ = T[self.classes_]
            zs_logits = self.keys_ @ self.text_embeddings_.T
            self.zs_scale_ = fit_temperature(zs_logits, yl)
            zs = softmax(self.zs_scale_ * zs_logits.astype(np.float64))
        S = self.keys_.astype(np.float64) @ self.keys_.T.astype(np.float64)
        off_diagonal = 1.0 - S[~np.eye(len(S), dtype=bool)]
        # beta is relative to the typical distance between labeled rows, so the same grid
        # suits CLIP features (cosines spread over 0..1) and features packed in a narrow cone
        self.distance_scale_ = float(max(np.mean(off_diagonal), 1e-6)) if off_diagonal.size else 1.0
        np.fill_diagonal(S, -np.inf)  # leave-one-out: exp(-inf) drops a row's own entry
        betas = BETA_GRID if self.beta == "auto" else (float(self.beta),)
        blends = (BLEND_GRID if self.blend == "auto" else (float(self.blend),)) if zs is not None else (1.0,)
        best = None
        for beta in betas:
            for blend in blends:
                scores = self._scores(S, zs, beta, blend)
                acc = float(np.mean(np.argmax(scores, axis=1) == yl))
                if best is None or acc > best[0]:
                    best = (acc, beta, blend, scores)
        _, self.beta_, self.blend_, scores = best
        self.scale_ = fit_temperature(np.log(np.maximum(scores, 1e-12)), yl)
        return self

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        X = l2_normalize(validate_rows(self, X))
        keys = self.keys_.T.astype(np.float64)
        text = self.text_embeddings_.T.astype(np.float64) if hasattr(self, "text_embeddings_") else None
        out = np.empty((len(X), len(self.classes_)))
        for start in range(0, len(X), 8192):  # float64 in blocks: exact enough, bounded memory
            Xb = X[start:start + 8192].astype(np.float64)
            zs = None if text is None else softmax(self.zs_scale_ * (Xb @ text))
            scores = self._scores(Xb @ keys, zs, self.beta_, self.blend_)
            out[start:start + 8192] = softmax(self.scale_ * np.log(np.maximum(scores, 1e-12)))
        return out

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


@register_head("kmeans")
class KMeansVoteHead(ClassifierMixin, BaseEstimator):
    """k-means cluster voting: an image takes the class mix of the clusters it falls in.

    Clusters all rows (labeled and unlabeled) with k-means++ (Lloyd's algorithm on a
    sample of at most 32 rows per cluster, then every row assigned; the clustering is
    shared with the label-propagation graph). Each cluster's class distribution counts its labeled members (divided
    by class size), then is smoothed by label propagation over the graph of centroids,
    so a cluster without labels inherits from similar clusters. A row's vote mixes the
    distributions of its ``n_nearest`` centroids, weighted by a softmax of cosine
    similarity with temperature ``temperature``.

    Parameters
    ----------
    n_clusters : int or "auto", default="auto"
        ``"auto"``: ``sqrt(n_samples)``, at least twice the number of classes, at most
        ``n_samples // 2`` and 4096.
    n_nearest : int, default=3
        Centroids mixed in a row's vote.
    temperature : float, default=0.05
        Softmax temperature over centroid similarities.
    alpha : float, default=0.9
        Strength of the propagation between centroids.
    random_state : int, default=0

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    cluster_distributions_ : ndarray of shape (n_clusters, n_classes)
    label_distributions_ : ndarray of shape (n_samples, n_classes)
        Votes of the fitted rows.
    """

    def __init__(self, n_clusters="auto", n_nearest=3, temperature=0.05, alpha=0.9, random_state=0):
        self.n_clusters = n_clusters
        self.n_nearest = n_nearest
        self.temperature = temperature
        self.alpha = alpha
        self.random_state = random_state

    def _clusters(self, X: np.ndarray, n_classes: int):
        """Centroids, row assignment and each row's soft vote weights (label-free, so cached)."""
        n = len(X)
        k = self.n_clusters
        if k == "auto":
            k = int(min(max(np.sqrt(n), 2 * n_classes), n // 2, 4096))
        k = max(1, min(int(k), n))
        digest = array_digest(X)
        key = (k, self.n_nearest, self.temperature, self.random_state, digest)
        cached = getattr(self, "_cluster_cache", None)
        if cached is None or cached[0] != key:
            centroids, assign = cluster_rows(X, k, seed=self.random_state, digest=digest)
            centroids = l2_normalize(centroids)
            self._cluster_cache = (key, centroids, assign, *self._soft_assign(X, centroids))
        return self._cluster_cache[1:]

    def _soft_assign(self, X: np.ndarray, centroids: np.ndarray):
        """The ``n_nearest`` centroids of each row and their softmax(cos / temperature) weights."""
        m = min(self.n_nearest, len(centroids))
        top = np.empty((len(X), m), dtype=np.int64)
        weights = np.empty((len(X), m))
        for start in range(0, len(X), 16_384):
            S = X[start:start + 16_384] @ centroids.T
            t = np.argpartition(-S, m - 1, axis=1)[:, :m]
            top[start:start + 16_384] = t
            weights[start:start + 16_384] = softmax(np.take_along_axis(S, t, axis=1).astype(np.float64)
                                                    / self.temperature)
        return top, weights

    def _votes(self, top: np.ndarray, weights: np.ndarray) -> np.ndarray:
        out = np.empty((len(top), len(self.classes_)))
        for start in range(0, len(top), 65_536):
            out[start:start + 65_536] = np.einsum("nm,nmc->nc", weights[start:start + 65_536],
                                                  self.cluster_distributions_[top[start:start + 65_536]])
        return normalize_rows(out)

    def fit(self, X, y):
        X, y, y_index = validate_semi_supervised(self, X, y)
        X = l2_normalize(X)
        n_classes = len(self.classes_)
        C, assign, top, weights = self._clusters(X, n_classes)
        labeled = y_index >= 0
        counts = np.bincount(y_index[labeled], minlength=n_classes)
        seeds = np.zeros((len(C), n_classes))
        np.add.at(seeds, (assign[labeled], y_index[labeled]), 1.0 / counts[y_index[labeled]])
        if len(C) > 1:  # propagate over the centroid kNN graph, solved exactly (few centroids)
            S = np.maximum(C @ C.T, 0.0).astype(np.float64) ** 3
            np.fill_diagonal(S, 0.0)
            kk = min(10, len(C) - 1)
            weak = np.argpartition(-S, kk - 1, axis=1)[:, kk:]
            np.put_along_axis(S, weak, 0.0, axis=1)
            S = np.maximum(S, S.T)
            d = 1.0 / np.sqrt(np.maximum(S.sum(axis=1), 1e-12))
            W = S * d[:, None] * d[None, :]
            seeds = np.linalg.solve(np.eye(len(C)) - self.alpha * W, seeds)
        self.cluster_centers_ = C
        self.cluster_distributions_ = normalize_rows(seeds)
        self.label_distributions_ = self._votes(top, weights).astype(np.float32)
        return self

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        X = l2_normalize(validate_rows(self, X))
        return self._votes(*self._soft_assign(X, self.cluster_centers_))

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
