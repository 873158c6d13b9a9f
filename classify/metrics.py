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
