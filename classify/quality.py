"""Label quality: probable label errors (cleanlab's confident learning) and near-duplicate pairs."""

from __future__ import annotations

import numpy as np


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every labeled row ranked by how probably its label is wrong.

    ``pred_probs`` must come from models that did not see the row's label (out-of-fold).
    Rows are ranked by self-confidence (``1 - p(given label)``); ``flagged`` says which of them
    ``cleanlab.filter.find_label_issues`` finds to be label issues.

    Returns
    -------
    order : ndarray of int
        Row indices, most suspect first.
    score : ndarray of float
        ``1 - p(given label)`` of each row in ``order``.
    flagged : ndarray of bool
        Whether cleanlab flags the row as a label issue.
    """
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    P = np.asarray(pred_probs, dtype=np.float64)
    if P.ndim != 2 or len(P) != len(labels):
        raise ValueError(f"pred_probs must have one row per label; got {P.shape} for {len(labels)} labels.")
    if len(labels) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros(0), np.zeros(0, dtype=bool)
    P = np.clip(P, 1e-12, None)
    P /= P.sum(axis=1, keepdims=True)
    score = 1.0 - P[np.arange(len(labels)), labels]
    present = np.unique(labels)
    if len(present) < 2:
        flagged_rows = np.zeros(0, dtype=np.int64)
    else:
        # cleanlab wants classes 0..K-1 that all occur: the classes without labels here are dropped
        column = {c: i for i, c in enumerate(present)}
        sub = P[:, present]
        sub /= sub.sum(axis=1, keepdims=True)
        flagged_rows = np.asarray(find_label_issues(np.array([column[c] for c in labels]), sub,
                                                    return_indices_ranked_by="self_confidence", n_jobs=1),
                                  dtype=np.int64)
    flagged = np.zeros(len(labels), dtype=bool)
    flagged[flagged_rows] = True
    # one ranking, by self-confidence (cleanlab's own ranking), flagged rows first among equal scores: putting
    # every flagged row first lost precision in the top k on digits (0.87 against 0.96 by score alone)
    order = np.lexsort((~flagged, -score))
    return order, score[order], flagged[order]


def near_duplicates(A: np.ndarray, B: np.ndarray | None = None, *, threshold: float = 0.98,
                    block: int = 4096) -> list[tuple[int, int, float]]:
    """Pairs ``(i, j, cosine)`` of unit rows with cosine ≥ ``threshold``: within ``A`` (i < j) when
    ``B`` is None, else between ``A`` and ``B``. Computed in blocks, so memory stays bounded."""
    A = np.asarray(A, dtype=np.float32)
    same = B is None
    B = A if same else np.asarray(B, dtype=np.float32)
    pairs = []
    for start in range(0, len(A), block):
        S = A[start:start + block] @ B.T
        rows, cols = np.nonzero(S >= threshold)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if same and c <= i:
                continue
            pairs.append((i, int(c), float(S[r, c])))
    return sorted(pairs, key=lambda p: -p[2])
