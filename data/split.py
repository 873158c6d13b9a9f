"""The seeded, stratified train/validation split of the labeled set."""

from __future__ import annotations

import numpy as np


def split_labeled(
    labels: np.ndarray, *, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split labeled rows into train and validation indices, class by class.

    Each class with at least two images gives ``round(val_fraction * n)`` of them
    (at least one, never all) to validation; a class with one image stays in train.
    The same ``labels`` and ``seed`` always give the same split.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,)
        Integer class labels; rows with ``-1`` (unlabeled) are ignored.
    val_fraction : float, default=0.2
        Fraction of each class held out for validation, in (0, 1).
    seed : int, default=0
        Seed of the shuffle.

    Returns
    -------
    train_idx, val_idx : ndarray of int
        Sorted row indices into ``labels``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train)) if train else empty,
            np.sort(np.concatenate(val)) if val else empty)
