"""Scores and plots for predictions: accuracy, macro-F1, NLL, ECE, confusion and class-similarity maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, *, n_bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def score_predictions(y_true: np.ndarray, proba: np.ndarray) -> dict:
    """Accuracy, macro-F1, NLL, ECE and per-class accuracy of soft predictions.

    Parameters
    ----------
    y_true : ndarray of shape (n_samples,)
        Class indices (columns of ``proba``).
    proba : ndarray of shape (n_samples, n_classes)

    Returns
    -------
    dict with ``n``, ``accuracy``, ``macro_f1``, ``nll``, ``ece`` (floats) and
    ``per_class_accuracy`` (list, NaN for classes absent from ``y_true``).
    """
    y_true = np.asarray(y_true)
    n_classes = proba.shape[1]
    if len(y_true) == 0:
        nan = float("nan")
        return {"n": 0, "accuracy": nan, "macro_f1": nan, "nll": nan, "ece": nan,
                "per_class_accuracy": [nan] * n_classes}
    pred = proba.argmax(axis=1)
    per_class = [float(np.mean(pred[y_true == c] == c)) if np.any(y_true == c) else float("nan")
                 for c in range(n_classes)]
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(pred == y_true)),
        "macro_f1": float(f1_score(y_true, pred, labels=np.unique(y_true), average="macro", zero_division=0)),
        "nll": float(-np.mean(np.log(np.maximum(proba[np.arange(len(y_true)), y_true], 1e-12)))),
        "ece": expected_calibration_error(proba, y_true),
        "per_class_accuracy": per_class,
    }


def _heatmap(matrix: np.ndarray, classes: list[str], path: Path, *, title: str, cmap: str,
             xlabel: str, ylabel: str, fmt: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap=cmap)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=classes, rotation=90, fontsize=max(5, 10 - n // 10))
    ax.set_yticks(range(n), labels=classes, fontsize=max(5, 10 - n // 10))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if fmt is not None and n <= 20:
        threshold = (np.nanmin(matrix) + np.nanmax(matrix)) / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    from clipfuse.data.files import write_with

    fig.tight_layout()
    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: str | Path) -> Path:
    """Save the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
    return _heatmap(cm, classes, Path(path), title="Confusion matrix", cmap="Blues",
                    xlabel="predicted", ylabel="true", fmt="d")


def class_similarity(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Cosine similarity between class mean embeddings, shape (n_classes, n_classes).

    Classes without rows get NaN.
    """
    means = np.full((n_classes, X.shape[1]), np.nan, dtype=np.float64)
    for c in range(n_classes):
        rows = X[y == c]
        if len(rows):
            m = rows.mean(axis=0)
            means[c] = m / max(np.linalg.norm(m), 1e-12)
    return means @ means.T


def plot_class_similarity(X: np.ndarray, y: np.ndarray, classes: list[str], path: str | Path) -> Path:
    """Save the heatmap of cosine similarities between class mean embeddings as a PNG.

    Bright off-diagonal cells are classes the embedding space confuses.
    """
    S = class_similarity(X, y, len(classes))
    return _heatmap(S, classes, Path(path), title="Similarity of class mean embeddings",
                    cmap="viridis", xlabel="class", ylabel="class", fmt=".2f")


def _class_indices(name: str, values, n_classes: int, *, allow_unlabeled: bool = False) -> np.ndarray:
    """``values`` as a 1-D int64 array of class indices, or a ValueError saying what to fix."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}; "
                         f"pass one integer per row (flatten it or take argmax of probabilities).")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}; "
                         f"map class names to their positions in `classes` first.")
    arr = arr.astype(np.int64)
    low = -1 if allow_unlabeled else 0
    bad = (arr < low) | (arr >= n_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        allowed = f"[0, {n_classes})" + (" or -1 (unlabeled)" if allow_unlabeled else "")
        raise ValueError(f"{name} has index {int(arr[first])} at row {first}, outside {allowed} "
                         f"for {n_classes} classes; pass indices into `classes` (or the full class list).")
    return arr


def confused_pairs(y_true, y_pred, classes, *, X=None, labels=None, top=10, examples=3) -> list[dict]:
    """The class pairs that validation confuses most, to show which class names need better words.

    A pair is unordered ``{a, b}`` with ``a != b``; its errors are the rows of true
    class ``a`` predicted as ``b`` plus those of true ``b`` predicted as ``a``.
    Pairs are ranked by errors (descending), ties by the similarity of their class
    mean embeddings (descending, NaN last), then by the names ``(class_a, class_b)``.
    Only pairs with at least one error are listed.

    Parameters
    ----------
    y_true : array-like of int, shape (n_rows,)
        True class indices of the validation rows, in ``[0, len(classes))``.
    y_pred : array-like of int, shape (n_rows,)
        Predicted class indices of the same rows.
    classes : list of str, length n_classes
        Class names; index ``i`` names class ``i``.
    X : ndarray of shape (n_labeled, dim), optional
        Embeddings of the labeled rows, used for ``similarity``. Without it,
        ``similarity`` is NaN.
    labels : array-like of int, shape (n_labeled,), optional
        Class indices of the rows of ``X`` (``-1`` marks an unlabeled row, which is
        skipped). Required together with ``X``.
    top : int or None, default 10
        Most pairs to return; ``None`` returns all.
    examples : int, default 3
        Most example rows per pair.

    Returns
    -------
    list of dict, at most ``top`` long, each with:

    - ``class_a``, ``class_b`` (str): ``class_a`` is the class of the larger directed
      count (on a tie, the lower index).
    - ``a_as_b``, ``b_as_a`` (int): rows of true ``class_a`` predicted ``class_b``, and
      the reverse.
    - ``errors`` (int): ``a_as_b + b_as_a``.
    - ``rate`` (float): ``errors`` over the number of validation rows whose true class
      is ``class_a`` or ``class_b``.
    - ``similarity`` (float): cosine between the L2-normalised class means of ``X``
      over the rows of ``labels`` equal to each class (see :func:`class_similarity`);
      NaN when ``X`` is None or a class has no row.
    - ``examples`` (list of int): at most ``examples`` row indices into
      ``y_true``/``y_pred`` of this pair's errors, ``a_as_b`` rows first, then
      ``b_as_a`` rows, each in row order.

    Raises
    ------
    ValueError
        On lengths that differ, indices outside ``[0, len(classes))``, non-integer
        indices, ``X`` without ``labels`` (or the reverse), or negative ``top``/``examples``.
    """
    classes = list(classes)
    n_classes = len(classes)
    if n_classes == 0:
        raise ValueError("classes is empty; pass the list of class names the indices refer to.")
    y_true = _class_indices("y_true", y_true, n_classes)
    y_pred = _class_indices("y_pred", y_pred, n_classes)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} rows but y_pred has {len(y_pred)}; "
                         f"pass the true and predicted class of the same validation rows.")
    for name, value in (("top", top), ("examples", examples)):
        if value is None and name == "top":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if (X is None) != (labels is None):
        raise ValueError("X and labels go together: pass both (the embeddings of the labeled rows "
                         "and their class indices) to get similarities, or neither.")

    similarity = np.full((n_classes, n_classes), np.nan)
    if X is not None:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D array (n_labeled, dim), got shape {X.shape}.")
        labels = _class_indices("labels", labels, n_classes, allow_unlabeled=True)
        if len(labels) != len(X):
            raise ValueError(f"X has {len(X)} rows but labels has {len(labels)}; "
                             f"pass one class index per row of X.")
        similarity = class_similarity(X, labels, n_classes)

    counts = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    counts = counts.reshape(n_classes, n_classes)
    support = np.bincount(y_true, minlength=n_classes)
    upper_a, upper_b = np.triu_indices(n_classes, k=1)
    totals = counts[upper_a, upper_b] + counts[upper_b, upper_a]
    keep = totals > 0

    pairs = []
    for i, j in zip(upper_a[keep].tolist(), upper_b[keep].tolist()):
        a, b = (j, i) if counts[j, i] > counts[i, j] else (i, j)
        sim = float(similarity[a, b])
        pairs.append((a, b, int(counts[a, b]), int(counts[b, a]), sim))
    pairs.sort(key=lambda p: (-(p[2] + p[3]), -p[4] if not np.isnan(p[4]) else np.inf,
                              classes[p[0]], classes[p[1]], p[0], p[1]))
    if top is not None:
        pairs = pairs[:top]

    result = []
    for a, b, a_as_b, b_as_a, sim in pairs:
        rows_ab = np.flatnonzero((y_true == a) & (y_pred == b))
        rows_ba = np.flatnonzero((y_true == b) & (y_pred == a))
        result.append({
            "class_a": classes[a],
            "class_b": classes[b],
            "a_as_b": a_as_b,
            "b_as_a": b_as_a,
            "errors": a_as_b + b_as_a,
            "rate": float((a_as_b + b_as_a) / (support[a] + support[b])),
            "similarity": sim,
            "examples": np.concatenate([rows_ab, rows_ba])[:examples].astype(int).tolist(),
        })
    return result


def risk_coverage(proba: np.ndarray, y_true: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy of the images kept against the share kept, keeping the most confident first.

    Returns ``{"threshold", "coverage", "accuracy"}``: keeping rows with confidence ≥
    ``threshold[i]`` keeps ``coverage[i]`` of them, right ``accuracy[i]`` of the time.
    """
    proba, y_true = np.asarray(proba), np.asarray(y_true)
    if len(y_true) == 0:
        empty = np.zeros(0)
        return {"threshold": empty, "coverage": empty, "accuracy": empty}
    conf = proba.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    correct = (proba.argmax(axis=1) == y_true)[order]
    kept = np.arange(1, len(order) + 1)
    return {"threshold": conf[order], "coverage": kept / len(order), "accuracy": np.cumsum(correct) / kept}


def threshold_for_precision(proba: np.ndarray, y_true: np.ndarray, target: float) -> tuple[float, float, float] | None:
    """``(threshold, coverage, accuracy)`` keeping the most images whose accuracy is still ≥ ``target``;
    None when no threshold reaches it."""
    curve = risk_coverage(proba, y_true)
    ok = np.flatnonzero(curve["accuracy"] >= target)
    if not len(ok):
        return None
    i = int(ok[-1])
    if i == len(curve["threshold"]) - 1:  # every image kept meets the target: nothing needs to abstain
        return 0.0, 1.0, float(curve["accuracy"][i])
    # rows tied at the threshold are all kept: step to the last row with that confidence that still qualifies
    return float(curve["threshold"][i]), float(curve["coverage"][i]), float(curve["accuracy"][i])


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Accuracy against coverage, one line per name in ``curves`` (``{name: (proba, y_true)}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipfuse.data.files import write_with

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (proba, y_true) in curves.items():
        c = risk_coverage(proba, y_true)
        ax.plot(c["coverage"], c["accuracy"], label=name)
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("accuracy of the kept images")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("risk-coverage on validation")
    fig.tight_layout()
    path = Path(path)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
