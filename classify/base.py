"""Shared pieces of the heads: the name registry, input checks and probability helpers."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_consistent_length, validate_data

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


class PreparedRows:
    """An input matrix checked once for the many head fits and predictions of an ensemble.

    Made by :func:`prepared_rows`. While its block runs, the helpers below recognise the
    array (by identity) and reuse the work instead of repeating it per head and per fold:
    :func:`validate_rows`, :func:`validate_X_y` and :func:`validate_semi_supervised` skip
    ``check_array`` (they still check the number of features), :func:`l2_normalize` returns
    :attr:`unit`, :func:`array_digest` hashes each array once, and :func:`take_rows` hands
    out row subsets that are prepared too.

    Attributes
    ----------
    given : array-like
        The matrix as passed (what heads are handed, so they see their usual input).
    X : ndarray of shape (n_samples, n_features), float32
        ``given`` after the checks of ``validate_data(dtype=[float64, float32])``, as float32.
    unit : ndarray of shape (n_samples, n_features), float32
        ``l2_normalize(X)``, computed on first use.
    """

    def __init__(self, given, X: np.ndarray):
        self.given = given
        self.X = X
        self._unit: np.ndarray | None = None
        self._digests: dict[int, str] = {}  # id of given, X or unit (all held here) -> digest
        self._subsets: dict[bytes, PreparedRows] = {}

    @property
    def unit(self) -> np.ndarray:
        if self._unit is None:
            self._unit = _unit_rows(self.X)
        return self._unit

    def holds(self, A) -> bool:
        """Whether ``A`` is this matrix as given or as checked. Not ``unit``: normalising unit
        rows again is not always a no-op (zero rows), so a head that does it computes it."""
        return A is self.given or A is self.X

    def digest(self, A) -> str | None:
        """``array_digest(A)``, hashed once, if ``A`` is one of this matrix's arrays; else None."""
        if not (self.holds(A) or (self._unit is not None and A is self._unit)):
            return None
        if id(A) not in self._digests:
            self._digests[id(A)] = _digest(A)
        return self._digests[id(A)]

    def take(self, rows: np.ndarray):
        """``given[rows]``, prepared as well; the same ``rows`` give the same array."""
        rows = np.asarray(rows)
        key = rows.dtype.str.encode() + repr(rows.shape).encode() + rows.tobytes()
        sub = self._subsets.get(key)
        if sub is None:
            X = self.X[rows]
            given = X if self.given is self.X or not isinstance(self.given, np.ndarray) else self.given[rows]
            sub = self._subsets[key] = PreparedRows(given, X)
        return sub.given

    def find(self, A) -> PreparedRows | None:
        """This matrix or the subset of it that ``A`` is, else None."""
        if self.holds(A):
            return self
        return next((sub for sub in self._subsets.values() if sub.holds(A)), None)


_PREPARED: ContextVar[tuple[PreparedRows, ...]] = ContextVar("clipfuse_prepared_rows", default=())


def prepared(A) -> PreparedRows | None:
    """The :class:`PreparedRows` of an active :func:`prepared_rows` block that ``A`` is, else None."""
    for prep in _PREPARED.get():
        found = prep.find(A)
        if found is not None:
            return found
    return None


@contextmanager
def prepared_rows(X, *, estimator=None):
    """Check ``X`` once, as the heads' ``validate_data`` would, and let the heads reuse the work.

    Inside the block, heads fitted on or asked about ``X`` itself (or a :func:`take_rows`
    subset of it) skip their own ``check_array``, L2 normalisation and hashing of it, so
    an ensemble does that work once per fit instead of once per head and fold. Heads used
    outside such a block check their input as usual. ``X`` must not change while the block
    runs. Yields the :class:`PreparedRows`.
    """
    prep = prepared(X)
    if prep is not None:  # nested: the outer block has checked it
        yield prep
        return
    checked = check_array(X, dtype=[np.float64, np.float32], input_name="X", estimator=estimator)
    prep = PreparedRows(X, checked.astype(np.float32, copy=False))
    token = _PREPARED.set(_PREPARED.get() + (prep,))
    try:
        yield prep
    finally:
        _PREPARED.reset(token)


def take_rows(X, rows: np.ndarray):
    """``X[rows]``; for a prepared ``X``, a prepared subset made once per ``rows``."""
    prep = prepared(X)
    return X[rows] if prep is None else prep.take(rows)


def validate_rows(estimator, X, *, reset: bool = False) -> np.ndarray:
    """``validate_data(estimator, X, dtype=[float64, float32], reset=reset)``. A prepared ``X``
    only has its number of features (and names) checked and comes back checked, as float32."""
    prep = prepared(X)
    if prep is None:
        return validate_data(estimator, X, dtype=[np.float64, np.float32], reset=reset)
    validate_data(estimator, X, skip_check_array=True, reset=reset)
    return prep.X


def validate_X_y(estimator, X, y):
    """``validate_data(estimator, X, y, dtype=[float64, float32], reset=True)``. A prepared ``X``
    is not checked again; ``y`` is, and that the lengths match."""
    prep = prepared(X)
    if prep is None:
        return validate_data(estimator, X, y, dtype=[np.float64, np.float32], reset=True)
    y = validate_data(estimator, y=y, reset=True)  # y first: a y-only call forgets feature names
    validate_data(estimator, X, skip_check_array=True, reset=True)
    check_consistent_length(prep.X, y)
    return prep.X, y


def _unit_rows(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.all(np.abs(norms - 1.0) < 1e-4):
        return X
    return X / np.maximum(norms, 1e-12)


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32.

    Rows that already have unit length (the store's vectors) are returned without a copy.
    A prepared matrix (see :func:`prepared_rows`) is normalised once per block.
    """
    prep = prepared(X)
    return _unit_rows(X) if prep is None else prep.unit


def _digest(X: np.ndarray) -> str:
    X = np.ascontiguousarray(X)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((X.shape, X.dtype.str)).encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()


def array_digest(X: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes): heads use it to reuse label-free work.

    The arrays of a prepared matrix (see :func:`prepared_rows`) are hashed once per block.
    """
    for prep in _PREPARED.get():
        for candidate in (prep, *prep._subsets.values()):
            digest = candidate.digest(X)
            if digest is not None:
                return digest
    return _digest(X)


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
    X, y = validate_X_y(estimator, X, y)
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
