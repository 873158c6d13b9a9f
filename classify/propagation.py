"""Graph learning over a kNN graph of the whole store: label spreading, Laplace and Poisson learning.

The graph (neighbour count, method) is chosen per fit by cross-validation over the labels: each
candidate is solved with a fold of the labels hidden and scored on that fold, so the choice follows
the data instead of a rule of thumb (on MNIST-5k pixels the best neighbour count was 5, on
store-scale CLIP features it is larger).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from clipfuse.classify.base import (
    array_digest,
    fit_temperature,
    l2_normalize,
    normalize_rows,
    register_head,
    softmax,
    validate_rows,
    validate_semi_supervised,
)
from clipfuse.classify.graph import EXACT_MAX_ROWS, cluster_rows, knn_graph

METHODS = ("spread", "poisson", "laplace")
KERNELS = ("self-tuning", "cosine")
CANDIDATE_NEIGHBORS = (5, 10, 20, 40)  # what n_neighbors="auto" chooses among on up to 20,000 rows
LARGE_NEIGHBORS = 20  # above that, label spreading on 20 neighbours: a candidate costs a store-wide solve per fold
_INNER_FOLDS = 3
_POISSON_SHIFT = 1e-3
_DEFAULT = ("poisson", 10)  # no label can be held out (one per class): Poisson learning on graphlearning's k


def _edge_weights(sims: np.ndarray, kernel: str, gamma: float) -> np.ndarray:
    """Weights of each row's edges to its neighbours (most similar first).

    ``self-tuning`` is graphlearning's Gaussian kernel with a per-row bandwidth (Zelnik-Manor
    & Perona): ``exp(-4 d² / d_k²)``, where ``d_k`` is the distance to the row's farthest
    listed neighbour, so dense and sparse regions get comparable degrees. ``cosine`` is
    ``max(cos, 0) ** gamma`` (Iscen et al.).
    """
    if kernel == "cosine":
        return np.power(np.maximum(sims, 0.0), gamma)
    d2 = np.maximum(2.0 - 2.0 * np.where(np.isfinite(sims), sims, -1.0), 0.0)  # unit vectors: |a-b|² = 2 - 2cos
    scale = np.max(np.where(np.isfinite(sims), d2, 0.0), axis=1, keepdims=True)
    w = np.exp(-4.0 * d2 / np.maximum(scale, 1e-12))
    return np.where(np.isfinite(sims), w, 0.0)


def weight_matrix(indices: np.ndarray, sims: np.ndarray, *, kernel: str = "self-tuning",
                  gamma: float = 3.0) -> sp.csr_matrix:
    """Symmetric kNN weight matrix ``(A + Aᵀ) / 2`` with zero diagonal, float32 CSR.

    ``indices``/``sims`` are :func:`~clipfuse.classify.graph.knn_graph` output (``-1`` pads).
    """
    n, k = indices.shape
    valid = indices >= 0
    rows = np.repeat(np.arange(n, dtype=np.int32), k)[valid.ravel()]
    cols = indices[valid].astype(np.int32)
    vals = _edge_weights(sims, kernel, gamma)[valid].astype(np.float32)
    A = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    W = ((A + A.T) * np.float32(0.5)).tocsr()
    W.setdiag(0)
    W.eliminate_zeros()
    return W


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
    """Solve ``A Z = B`` for every column of ``B`` at once (A symmetric positive semi-definite,
    ``B`` in its range)."""
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


class _Graph:
    """One weight matrix and what every solver needs of it: degrees, the normalised affinity
    ``D^-1/2 W D^-1/2`` (products threaded on large graphs), the order of its rows."""

    def __init__(self, W: sp.csr_matrix, perm: np.ndarray):
        self.W = W
        self.perm = perm  # row i of W is fitted row perm[i]
        self.n = W.shape[0]
        self.degree = np.asarray(W.sum(axis=1), dtype=np.float64).ravel()
        self.inv_sqrt = np.where(self.degree > 0, 1.0 / np.sqrt(np.maximum(self.degree, 1e-30)), 0.0)
        D = sp.diags(self.inv_sqrt.astype(np.float32))
        self.S = (D @ W @ D).tocsr().astype(np.float32)
        self.threads = min(os.cpu_count() or 1, 8) if self.n > EXACT_MAX_ROWS else 1

    def solve(self, method: str, y_index: np.ndarray, n_classes: int, *, alpha: float, max_iter: int,
              tol: float) -> tuple[np.ndarray, int]:
        """Class scores (n, n_classes) of every fitted row from the labeled rows (``y_index >= 0``),
        in fitted-row order."""
        scores, it = self._solve(method, y_index[self.perm], n_classes, alpha=alpha, max_iter=max_iter, tol=tol)
        out = np.empty_like(scores)
        out[self.perm] = scores
        return out, it

    def _solve(self, method: str, y_index: np.ndarray, n_classes: int, *, alpha: float, max_iter: int,
               tol: float) -> tuple[np.ndarray, int]:
        labeled = np.flatnonzero(y_index >= 0)
        F = np.zeros((len(labeled), n_classes), dtype=np.float32)
        F[np.arange(len(labeled)), y_index[labeled]] = 1.0
        if method == "laplace":
            return self._laplace(labeled, F, max_iter=max(max_iter, 200), tol=tol)
        St = _ThreadedMatrix(self.S, self.threads)
        try:
            if method == "spread":  # Zhou et al. 2004: (I - alpha S) Z = Y, each class's labels summing to one
                counts = np.maximum(F.sum(axis=0), 1.0)
                Y = np.zeros((self.n, n_classes), dtype=np.float32)
                Y[labeled] = F / counts
                a = np.float32(alpha)
                return _conjugate_gradient(lambda P: P - a * (St @ P), Y, max_iter=max_iter, tol=tol)
            # Poisson learning (Calder et al. 2020): L u = sum_j delta_j (y_j - ybar), solved as graphlearning
            # does, with the normalised Laplacian I - S on v = D^1/2 u. A component of the graph that holds some
            # labels but not all makes that system inconsistent (conjugate gradient then diverges), so I - S is
            # shifted by 1e-3: the solution is Poisson's up to a per-component offset of each class
            src = np.zeros((self.n, n_classes), dtype=np.float32)
            src[labeled] = F - F.mean(axis=0)
            B = (self.inv_sqrt[:, None] * src).astype(np.float32)
            a = np.float32(1.0 - _POISSON_SHIFT)
            V, it = _conjugate_gradient(lambda P: P - a * (St @ P), B, max_iter=max(max_iter, 200),
                                        tol=max(tol, 1e-3))
            return (self.inv_sqrt[:, None] * V).astype(np.float32), it
        finally:
            St.close()

    def _laplace(self, labeled: np.ndarray, F: np.ndarray, *, max_iter: int, tol: float):
        """Laplace learning (Zhu et al. 2003): the harmonic extension of the labels, ``L_uu u = W_ul F``,
        with a Jacobi-preconditioned conjugate gradient (graphlearning's solver)."""
        unl = np.ones(self.n, dtype=bool)
        unl[labeled] = False
        U = np.flatnonzero(unl)
        Wu = self.W[U]
        Wuu = Wu[:, U]
        B = np.asarray(Wu[:, labeled] @ F, dtype=np.float32)
        diag = self.degree[U]
        m = np.where(diag > 0, 1.0 / np.sqrt(np.maximum(diag, 1e-30)), 0.0).astype(np.float32)
        Wt = _ThreadedMatrix(Wuu, self.threads)
        try:
            # M (D_uu - W_uu) M v = M b, u = M v; rows with no edges keep u = 0
            V, it = _conjugate_gradient(lambda P: P - m[:, None] * (Wt @ (m[:, None] * P)), m[:, None] * B,
                                        max_iter=max_iter, tol=tol)
        finally:
            Wt.close()
        out = np.zeros((self.n, F.shape[1]), dtype=np.float32)
        out[U] = m[:, None] * V
        out[labeled] = F
        return out, it


def _logits(method: str, scores: np.ndarray) -> np.ndarray:
    """Scores as logits the temperature acts on: log of the normalised non-negative scores of
    spreading and Laplace learning, Poisson's potentials over their spread."""
    if method == "poisson":
        return scores / max(float(np.std(scores)), 1e-12)
    P = normalize_rows(scores)
    return np.log(np.maximum(P, 1e-6))


def inner_folds(y_index: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each labeled row (-1 for unlabeled and for the single label of a class, which can't be
    held out), dealt round-robin within each class after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds = np.full(len(y_index), -1, dtype=np.int64)
    offset = 0
    for c in np.unique(y_index[y_index >= 0]):
        mine = np.flatnonzero(y_index == c)
        if len(mine) < 2:
            continue
        rng.shuffle(mine)
        folds[mine] = (np.arange(len(mine)) + offset) % n_folds
        offset += len(mine)
    return folds


@register_head("propagation")
class LabelPropagationHead(ClassifierMixin, BaseEstimator):
    """Graph learning over a kNN graph of labeled and unlabeled rows, with the graph and the
    method chosen from the labels.

    Builds a k-nearest-neighbour graph over all rows (``-1`` labels included), weights its
    edges (``kernel``) and symmetrises it, then solves one of

    * ``spread``: label spreading, ``(I - alpha S) Z = Y`` with ``S = D^-1/2 W D^-1/2`` and each
      class's seeds summing to one (Zhou et al. 2004; Iscen et al. 2019 at store scale);
    * ``laplace``: Laplace learning, the harmonic extension of the labels (Zhu et al. 2003);
    * ``poisson``: Poisson learning, ``L u = sum_j (y_j - ybar) delta_j`` (Calder et al.
      2020), which stays informative at one label per class where Laplace learning flattens.

    With ``n_neighbors="auto"`` and/or ``method="auto"`` every candidate is scored by
    ``3``-fold cross-validation over the labels (each fold's labels hidden, accuracy on
    them) and the best is kept; ties go to the lower held-out log-likelihood loss at a
    temperature fitted on the same held-out predictions, which turns its scores into
    probabilities. When no
    label can be held out (one per class) the choice is Poisson learning on 10
    neighbours, graphlearning's default, designed for that regime. On more than 20,000
    rows it is label spreading on 20 neighbours, with no search: each candidate would
    cost a store-wide solve per fold, and the ensemble fits the head five times (on
    300,000 x 512 a search over two k tripled the stack's time). ``selection_`` records
    every candidate's score.

    A new row gets the similarity-weighted soft labels of its nearest fitted rows.

    Parameters
    ----------
    n_neighbors : int or "auto", default="auto"
        Neighbours per row in the graph; ``"auto"`` chooses among 5, 10, 20 and 40 (20 above
        20,000 rows).
    method : {"auto", "spread", "laplace", "poisson"}, default="auto"
    kernel : {"self-tuning", "cosine"}, default="self-tuning"
        Edge weights: ``exp(-4 d² / d_k²)`` with each row's own bandwidth (graphlearning's
        kNN kernel), or ``max(cos, 0) ** gamma``.
    alpha : float, default=0.99
        Diffusion strength of ``spread`` in (0, 1); near 1 spreads labels far along the graph.
    gamma : float, default=3.0
        Power of the cosine kernel, and of the similarities that weight the neighbours of a
        new row.
    max_iter : int, default=20
        Conjugate-gradient iterations of ``spread`` (as in Iscen et al.); Laplace and
        Poisson learning run up to ``max(max_iter, 200)``.
    tol : float, default=1e-4
        Relative residual at which conjugate gradient stops early (Poisson: at least 1e-3,
        as graphlearning).
    graph : {"auto", "exact", "ivf", "hnsw"}, default="auto"
        How the neighbour graph is built, see :func:`~clipfuse.classify.graph.knn_graph`.
    random_state : int, default=0
        Seed of the approximate graph builders and of the inner folds.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    method_ : str
    n_neighbors_ : int
        The method and neighbour count used.
    selection_ : dict of str -> float
        Cross-validated accuracy of each candidate (``"<method>/<k>"``); empty when no
        choice was made from the labels.
    temperature_ : float
        Scale of the logits, fitted on the held-out predictions (1 without them).
    transduction_ : ndarray of shape (n_samples,)
        Predicted class of every fitted row.
    label_distributions_ : ndarray of shape (n_samples, n_classes)
        Soft labels of the fitted rows.
    certainty_ : ndarray of shape (n_samples,)
        ``1 - entropy / log(n_classes)`` of each soft label (1 = one class, 0 = uniform).
    n_iter_ : int
        Conjugate-gradient iterations of the final solve.
    """

    def __init__(self, n_neighbors="auto", method="auto", kernel="self-tuning", alpha=0.99, gamma=3.0,
                 max_iter=20, tol=1e-4, graph="auto", random_state=0):
        self.n_neighbors = n_neighbors
        self.method = method
        self.kernel = kernel
        self.alpha = alpha
        self.gamma = gamma
        self.max_iter = max_iter
        self.tol = tol
        self.graph = graph
        self.random_state = random_state

    def _check_params(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha!r}.")
        if self.method not in ("auto", *METHODS):
            raise ValueError(f"method must be auto, {', '.join(METHODS)}; got {self.method!r}.")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {self.kernel!r}.")
        if not (isinstance(self.gamma, (int, float, np.number)) and np.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a positive finite number; got {self.gamma!r}.")
        if not (isinstance(self.tol, (int, float, np.number)) and np.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol must be a positive finite number; got {self.tol!r}.")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter!r}.")
        k = self.n_neighbors
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"n_neighbors must be a positive integer or 'auto'; got {k!r}.")

    def _candidates(self, n: int) -> list[tuple[str, int]]:
        large = n > EXACT_MAX_ROWS
        methods = [self.method] if self.method != "auto" else (["spread"] if large else list(METHODS))
        ks = ([int(self.n_neighbors)] if self.n_neighbors != "auto"
              else [LARGE_NEIGHBORS] if large else list(CANDIDATE_NEIGHBORS))
        ks = list(dict.fromkeys(max(1, min(k, n - 1)) for k in ks))
        # the earlier candidate wins ties: 10 neighbours and label spreading first
        ks.sort(key=lambda k: (k != 10, k))
        return [(m, k) for m in methods for k in ks]

    def fit(self, X, y):
        self._check_params()
        X, y, y_index = validate_semi_supervised(self, X, y)
        X = l2_normalize(X)
        n_classes = len(self.classes_)
        self.selection_, self.temperature_ = {}, 1.0
        if len(X) < 2:
            Z = np.zeros((len(X), n_classes), dtype=np.float32)
            Z[y_index >= 0, y_index[y_index >= 0]] = 1.0
            self.label_distributions_ = Z
            self.method_, self.n_neighbors_, self.n_iter_ = "spread", 0, 0
        else:
            self._fit_graph(X, y_index, n_classes)
        self.certainty_ = self._certainty(self.label_distributions_)
        self.transduction_ = self.classes_[np.argmax(self.label_distributions_, axis=1)]
        self.X_fit_ = X
        return self

    def _fit_graph(self, X: np.ndarray, y_index: np.ndarray, n_classes: int) -> None:
        candidates = self._candidates(len(X))
        folds = inner_folds(y_index, _INNER_FOLDS, self.random_state)
        held = np.flatnonzero(folds >= 0)
        if len(held) == 0:  # one label per class: nothing to choose by
            method = _DEFAULT[0] if self.method == "auto" else self.method
            k = _DEFAULT[1] if self.n_neighbors == "auto" else int(self.n_neighbors)
            candidates = [(method, min(k, len(X) - 1))]
        digest = array_digest(X)
        indices, sims = self._graph(X, max(k for _, k in candidates), digest)
        solve = dict(alpha=self.alpha, max_iter=self.max_iter, tol=self.tol)
        best = None  # ((held-out accuracy, -NLL), method, k, temperature)
        # one candidate on a large store: its held-out solves would only fit a temperature, which the
        # ensemble's fusion fits again per head; three store-wide solves per fit saved
        skip = len(held) == 0 or (len(candidates) == 1 and len(X) > EXACT_MAX_ROWS)
        for method, k in candidates:
            G = self._weights(X, indices, sims, k, digest)
            if skip:
                best = ((0.0, 0.0), method, k, 1.0)
                break
            oof = np.zeros((len(X), n_classes), dtype=np.float32)
            for f in np.unique(folds[held]):
                at = folds == f
                scores, _ = G.solve(method, np.where(at, -1, y_index), n_classes, **solve)
                oof[at] = _logits(method, scores)[at]
            acc = float(np.mean(np.argmax(oof[held], axis=1) == y_index[held]))
            t = fit_temperature(oof[held], y_index[held])
            # accuracy first; the held-out log-likelihood at the fitted temperature breaks its many ties
            nll = -float(np.mean(np.log(np.maximum(softmax(t * oof[held].astype(np.float64))[
                np.arange(len(held)), y_index[held]], 1e-12))))
            if len(candidates) > 1:
                self.selection_[f"{method}/{k}"] = acc
            if best is None or (acc, -nll) > best[0]:
                best = ((acc, -nll), method, k, t)
        _, self.method_, self.n_neighbors_, self.temperature_ = best
        scores, self.n_iter_ = self._weights(X, indices, sims, self.n_neighbors_, digest).solve(
            self.method_, y_index, n_classes, **solve)
        logits = _logits(self.method_, scores).astype(np.float64)
        self.label_distributions_ = softmax(self.temperature_ * logits).astype(np.float32)

    def _weights(self, X: np.ndarray, indices: np.ndarray, sims: np.ndarray, k: int, digest: str) -> _Graph:
        """The graph of the ``k`` nearest neighbours, rows in k-means cell order on large sets (neighbours
        then sit in nearby rows, which makes the sparse products cache-friendly). Cached per
        (graph, k, kernel), so that refits with other labels reuse it."""
        key = (self._graph_cache[0], k, self.kernel, self.gamma)
        cache = self.__dict__.setdefault("_weights_cache", {})
        if key not in cache:
            perm = self._order(X, digest)
            inverse = np.empty_like(perm)
            inverse[perm] = np.arange(len(perm))
            idx, sim = indices[perm, :k], sims[perm, :k]
            idx = np.where(idx >= 0, inverse[np.maximum(idx, 0)], -1)
            if len(cache) >= len(CANDIDATE_NEIGHBORS):
                cache.clear()
            cache[key] = _Graph(weight_matrix(idx, sim, kernel=self.kernel, gamma=self.gamma), perm)
        return cache[key]

    def _order(self, X: np.ndarray, digest: str) -> np.ndarray:
        if len(X) <= EXACT_MAX_ROWS:
            return np.arange(len(X))
        _, assign = cluster_rows(X, int(np.clip(np.sqrt(len(X)), 8, 4096)), seed=self.random_state, digest=digest)
        return np.argsort(assign, kind="stable")

    def _graph(self, X: np.ndarray, k: int, digest: str):
        """The neighbour graph of ``X`` (``k`` per row), reused when the same rows are fitted again."""
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
