"""Label propagation over a kNN graph of the whole store (Iscen et al., CVPR 2019)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from clipfuse.classify.base import (
    array_digest,
    l2_normalize,
    normalize_rows,
    register_head,
    validate_rows,
    validate_semi_supervised,
)
from clipfuse.classify.graph import EXACT_MAX_ROWS, cluster_rows, knn_graph


def _affinity(indices: np.ndarray, sims: np.ndarray, gamma: float) -> sp.csr_matrix:
    """Symmetric, degree-normalised affinity D^-1/2 (A + Aᵀ) D^-1/2 with A_ij = max(s_ij, 0)^gamma."""
    n, k = indices.shape
    valid = indices >= 0
    rows = np.repeat(np.arange(n, dtype=np.int32), k)[valid.ravel()]
    cols = indices[valid].astype(np.int32)
    vals = np.power(np.maximum(sims[valid], 0.0), gamma).astype(np.float32)
    A = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    W = (A + A.T).tocsr()
    degree = np.asarray(W.sum(axis=1)).ravel()
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0).astype(np.float32)
    D = sp.diags(inv_sqrt)
    return (D @ W @ D).tocsr().astype(np.float32)


class _ThreadedMatrix:
    """A CSR matrix whose product with a dense matrix runs in row blocks on all cores.

    scipy's sparse product is single-threaded but releases the GIL, so row blocks in
    threads add up; it dominates each conjugate-gradient iteration.
    """

    def __init__(self, W: sp.csr_matrix, n_blocks: int):
        bounds = np.linspace(0, W.shape[0], n_blocks + 1).astype(int)
        self.blocks = [W[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
        self.pool = ThreadPoolExecutor(n_blocks) if n_blocks > 1 else None

    def __matmul__(self, P: np.ndarray) -> np.ndarray:
        if self.pool is None:
            return self.blocks[0] @ P
        return np.vstack(list(self.pool.map(lambda block: block @ P, self.blocks)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _conjugate_gradient(matvec, B: np.ndarray, *, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    """Solve ``A Z = B`` for every column of ``B`` at once (A symmetric positive definite)."""
    Z = np.zeros_like(B)
    R = B.copy()
    P = R.copy()
    rs = np.einsum("ij,ij->j", R, R)
    b_norm = np.sqrt(np.maximum(rs, 1e-30))
    for it in range(1, max_iter + 1):
        AP = matvec(P)
        step = rs / np.maximum(np.einsum("ij,ij->j", P, AP), 1e-30)
        Z += P * step
        R -= AP * step
        rs_new = np.einsum("ij,ij->j", R, R)
        if np.max(np.sqrt(rs_new) / b_norm) < tol:
            return Z, it
        P = R + P * (rs_new / np.maximum(rs, 1e-30))
        rs = rs_new
    return Z, max_iter


@register_head("propagation")
class LabelPropagationHead(ClassifierMixin, BaseEstimator):
    """Diffuse the labels over a kNN graph of labeled and unlabeled rows.

    Builds a k-nearest-neighbour graph over all rows (``-1`` labels included), weights
    edges by ``max(cos, 0) ** gamma``, symmetrises and degree-normalises it, and solves
    ``(I - alpha * W) Z = Y`` with conjugate gradient, where ``Y`` holds each labeled row
    divided by its class size so large classes cannot drown small ones. ``Z`` row-
    normalised gives the soft label of every row (``transduction_``); a new row gets the
    similarity-weighted soft labels of its nearest fitted rows.

    Parameters
    ----------
    n_neighbors : int or "auto", default="auto"
        Neighbours per row in the graph. ``"auto"`` takes about 5% of an average class,
        between 10 and 50 (50 at store scale, as in Iscen et al.; fewer on small sets,
        where 50 neighbours would reach across classes).
    alpha : float, default=0.99
        Diffusion strength in (0, 1); near 1 spreads labels far along the graph.
    gamma : float, default=3.0
        Power applied to cosine similarities (sharpens the graph).
    max_iter : int, default=20
        Conjugate-gradient iterations, as in Iscen et al.
    tol : float, default=1e-4
        Relative residual at which conjugate gradient stops early.
    graph : {"auto", "exact", "ivf", "hnsw"}, default="auto"
        How the neighbour graph is built, see :func:`~clipfuse.classify.graph.knn_graph`.
    random_state : int, default=0
        Seed of the approximate graph builders.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    transduction_ : ndarray of shape (n_samples,)
        Predicted class of every fitted row.
    label_distributions_ : ndarray of shape (n_samples, n_classes)
        Soft labels of the fitted rows.
    certainty_ : ndarray of shape (n_samples,)
        ``1 - entropy / log(n_classes)`` of each soft label (1 = one class, 0 = uniform).
    n_iter_ : int
        Conjugate-gradient iterations run.
    """

    def __init__(self, n_neighbors="auto", alpha=0.99, gamma=3.0, max_iter=20, tol=1e-4,
                 graph="auto", random_state=0):
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.gamma = gamma
        self.max_iter = max_iter
        self.tol = tol
        self.graph = graph
        self.random_state = random_state

    def fit(self, X, y):
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha!r}.")
        X, y, y_index = validate_semi_supervised(self, X, y)
        X = l2_normalize(X)
        n_classes = len(self.classes_)
        if len(X) < 2:
            Z = np.zeros((len(X), n_classes), dtype=np.float32)
            Z[y_index >= 0, y_index[y_index >= 0]] = 1.0
            self.n_iter_ = 0
        else:
            digest = array_digest(X)
            indices, sims = self._graph(X, n_classes, digest)
            W, perm = self._affinity(X, indices, sims, digest)
            Y = np.zeros((len(X), n_classes), dtype=np.float32)
            labeled = np.flatnonzero(y_index >= 0)
            counts = np.bincount(y_index[labeled], minlength=n_classes).astype(np.float32)
            Y[labeled, y_index[labeled]] = 1.0 / counts[y_index[labeled]]
            alpha = np.float32(self.alpha)
            Wt = _ThreadedMatrix(W, min(os.cpu_count() or 1, 8) if len(X) > EXACT_MAX_ROWS else 1)
            try:
                Zp, self.n_iter_ = _conjugate_gradient(lambda P: P - alpha * (Wt @ P), Y[perm],
                                                       max_iter=self.max_iter, tol=self.tol)
            finally:
                Wt.close()
            Z = np.empty_like(Zp)
            Z[perm] = Zp
        self.label_distributions_ = normalize_rows(Z).astype(np.float32)
        self.certainty_ = self._certainty(self.label_distributions_)
        self.transduction_ = self.classes_[np.argmax(self.label_distributions_, axis=1)]
        self.X_fit_ = X
        return self

    def _affinity(self, X: np.ndarray, indices: np.ndarray, sims: np.ndarray, digest: str):
        """The normalised affinity with rows in k-means cell order, and that order.

        Neighbours then sit in nearby rows, which makes the sparse products cache-friendly.
        Cached with the graph.
        """
        cached = getattr(self, "_affinity_cache", None)
        key = (self._graph_cache[0], self.gamma)
        if cached is None or cached[0] != key:
            perm = np.arange(len(X))
            if len(X) > EXACT_MAX_ROWS:
                _, assign = cluster_rows(X, int(np.clip(np.sqrt(len(X)), 8, 4096)), seed=self.random_state,
                                         digest=digest)
                perm = np.argsort(assign, kind="stable")
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            valid = indices[perm] >= 0
            W = _affinity(np.where(valid, inverse[np.maximum(indices[perm], 0)], -1), sims[perm], self.gamma)
            self._affinity_cache = (key, W, perm)
        return self._affinity_cache[1], self._affinity_cache[2]

    def _graph(self, X: np.ndarray, n_classes: int, digest: str):
        """The neighbour graph of ``X``, reused when the same rows are fitted again."""
        k = self.n_neighbors
        if k == "auto":
            k = int(np.clip(len(X) // (20 * n_classes), 10, 50))
        key = (k, self.graph, self.random_state, digest)
        cached = getattr(self, "_graph_cache", None)
        if cached is None or cached[0] != key:
            self._graph_cache = (key, knn_graph(X, k, method=self.graph, seed=self.random_state, digest=digest))
        return self._graph_cache[1]

    @staticmethod
    def _certainty(P: np.ndarray) -> np.ndarray:
        if P.shape[1] < 2:
            return np.ones(len(P), dtype=np.float32)
        entropy = -np.sum(P * np.log(np.maximum(P, 1e-12)), axis=1)
        return (1.0 - entropy / np.log(P.shape[1])).astype(np.float32)

    def predict_proba(self, X):
        """Soft labels of new rows: similarity^gamma-weighted soft labels of their fitted neighbours.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        X = l2_normalize(validate_rows(self, X))
        if getattr(self, "X_fit_", None) is None:
            raise ValueError(
                "This LabelPropagationHead was loaded without its fitted embeddings, so it can only "
                "answer for the rows it was fitted on. Pass them to load_ensemble(external={'X_fit_': X})."
            )
        k = max(1, min(10, len(self.X_fit_)))
        out = np.empty((len(X), len(self.classes_)), dtype=np.float64)
        for start in range(0, len(X), 1024):
            S = X[start:start + 1024] @ self.X_fit_.T
            top = np.argpartition(-S, k - 1, axis=1)[:, :k]
            w = np.power(np.maximum(np.take_along_axis(S, top, axis=1), 0.0), self.gamma) + 1e-12
            out[start:start + 1024] = np.einsum("nk,nkc->nc", w, self.label_distributions_[top])
        return normalize_rows(out)

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
