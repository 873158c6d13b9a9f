"""Shared pieces of the heads: the name registry, input checks and probability helpers."""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

UNLABELED = -1

_HEADS: dict[str, type] = {}


def register_head(name: str):
    """Class decorator: make a head creatable by ``name`` (the CLI uses the same names)."""

    def decorator(cls):
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"A head named {name!r} is already registered ({_HEADS[name].__name__}).")
        _HEADS[name] = cls
        cls.head_name = name
        return cls

    return decorator


def list_heads() -> list[str]:
    """Names of the registered heads, in registration order."""
    return list(_HEADS)


def get_head_class(name: str) -> type:
    """The head class registered under ``name``."""
    try:
        return _HEADS[name]
    except KeyError:
        raise ValueError(f"Unknown head {name!r}; choose from {', '.join(_HEADS)}.") from None


def create_head(name: str, **params):
    """Instantiate the head registered under ``name`` with keyword ``params``."""
    return get_head_class(name)(**params)


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32.

    Rows that already have unit length (the store's vectors) are returned without a copy.
    """
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1.0) < 1e-4):
        return X
    return X / np.maximum(norms, 1e-12)


def array_digest(X: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes): heads use it to reuse label-free work."""
    X = np.ascontiguousarray(X)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((X.shape, X.dtype.str)).encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()


def linear_logits(X: np.ndarray, W: np.ndarray, b: np.ndarray | float = 0.0, *, block: int = 8192) -> np.ndarray:
    """``X @ W.T + b`` in float64, a block of rows at a time (exact for any batch size, small
    temporaries), shape (n_samples, n_outputs)."""
    Wt = np.asarray(W, dtype=np.float64).T
    out = np.empty((len(X), Wt.shape[1]))
    for start in range(0, len(X), block):
        out[start:start + block] = np.asarray(X[start:start + block], dtype=np.float64) @ Wt
    out += b
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def normalize_rows(P: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to one; an all-zero row becomes uniform."""
    P = np.maximum(np.asarray(P, dtype=np.float64), 0.0)
    sums = P.sum(axis=1, keepdims=True)
    uniform = np.full_like(P, 1.0 / max(P.shape[1], 1))
    return np.where(sums > 0, P / np.where(sums > 0, sums, 1.0), uniform)


def validate_semi_supervised(estimator, X, y):
    """Check ``X, y`` for ``fit`` (``-1`` marks unlabeled rows) and set ``classes_``.

    Labels may be any sortable values (as in scikit-learn); ``-1`` means unlabeled when
    they are numbers. Returns ``X`` as float32, ``y`` and the index of each labeled row's class in
    ``classes_`` (``-1`` for unlabeled rows).
    """
    X, y = validate_data(estimator, X, y, dtype=[np.float64, np.float32], reset=True)
    check_classification_targets(y)
    y = np.asarray(y)
    unlabeled = (y == UNLABELED) if np.issubdtype(y.dtype, np.number) else np.zeros(len(y), bool)
    classes = np.unique(y[~unlabeled])
    if len(classes) < 1:
        raise ValueError(
            f"{type(estimator).__name__} needs at least one labeled row (label != -1); all "
            f"{len(y)} rows are unlabeled."
        )
    estimator.classes_ = classes
    y_index = np.full(len(y), UNLABELED, dtype=np.int64)
    y_index[~unlabeled] = np.searchsorted(classes, y[~unlabeled])
    return X.astype(np.float32, copy=False), y, y_index


def to_float32(A: np.ndarray) -> np.ndarray:
    """``A`` as float32 with magnitudes below 1e-30 set to zero.

    Softmax gradients hold values like 1e-42 that float32 can only store as subnormals,
    and BLAS on x86 runs 10-50x slower on subnormal inputs.
    """
    A = np.asarray(A, dtype=np.float32)
    A[np.abs(A) < 1e-30] = 0.0
    return A


def one_hot(y_index: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_classes) float32 indicator matrix; rows with ``-1`` stay zero."""
    Y = np.zeros((len(y_index), n_classes), dtype=np.float32)
    rows = np.flatnonzero(y_index >= 0)
    Y[rows, y_index[rows]] = 1.0
    return Y


def fit_temperature(logits: np.ndarray, y_index: np.ndarray) -> float:
    """The scale ``t`` minimising the NLL of ``softmax(t * logits)`` on labeled rows."""
    logits = np.asarray(logits, dtype=np.float64)
    grid = np.exp(np.linspace(np.log(1e-2), np.log(1e3), 61))

    def nll(t):
        P = softmax(t * logits)
        return -np.mean(np.log(np.maximum(P[np.arange(len(y_index)), y_index], 1e-12)))

    losses = [nll(t) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 21))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])
