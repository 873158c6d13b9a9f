"""The learned ensemble: fit the heads on the train split, learn their weights on validation, refit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy.optimize import minimize

from clipfuse.classify.base import create_head, fit_temperature, prepared_rows, softmax, take_rows
from clipfuse.classify.linear import HeadUnavailableError
from clipfuse.classify.metrics import score_predictions
from clipfuse.classify.priors import adjust_priors, estimate_priors, total_variation
from clipfuse.data.files import write_text_atomic, write_with
from clipfuse.data.split import split_labeled

_EPS = 1e-6


class WeightedFusion:
    """Fused log-probabilities: ``softmax(sum_h w_h * log p_h)`` with learned ``w_h >= 0``.

    A weight is both a vote share and an inverse temperature, so an overconfident head is
    damped and a useless one gets weight 0. The weights minimise the negative
    log-likelihood of the training rows plus ``l2 * ||w - w0||²``, where the prior ``w0``
    puts all weight on the single best head (lowest NLL after fitting its temperature).
    The ensemble therefore moves away from its best head only as far as the evidence
    supports: with 15 labels per class there are few rows to learn from, and an
    unregularised fit chases noise (on digits it lost up to 1.2 points to the best head;
    shrunk, it stays within 0.3 points over six label draws).

    Parameters
    ----------
    l2 : float, default=0.03
        Strength of the pull toward the best single head.

    Attributes
    ----------
    weights_ : ndarray of shape (n_heads,)
    best_head_ : int
        Index of the head the prior favours.
    """

    def __init__(self, l2: float = 0.03, rule: str = "weighted"):
        self.l2 = l2
        self.rule = rule

    def fit(self, log_probs: np.ndarray, y: np.ndarray) -> WeightedFusion:
        """Learn the weights from ``log_probs`` of shape (n_samples, n_heads, n_classes).

        ``rule`` ``"best-head"`` keeps only the best head (at its temperature), ``"average"``
        gives every head the same vote at its own temperature; ``"weighted"`` learns them."""
        if self.rule not in FUSION_RULES:
            raise ValueError(f"rule must be one of {', '.join(FUSION_RULES)}; got {self.rule!r}.")
        L = np.asarray(log_probs, dtype=np.float64)
        n, n_heads, _ = L.shape
        rows = np.arange(n)
        temps = np.array([fit_temperature(L[:, h], y) for h in range(n_heads)])
        nll = [-np.mean(np.log(np.maximum(softmax(temps[h] * L[:, h])[rows, y], 1e-300)))
               for h in range(n_heads)]
        self.temperatures_ = temps
        self.best_head_ = int(np.argmin(nll))
        prior = np.zeros(n_heads)
        prior[self.best_head_] = temps[self.best_head_]
        if self.rule != "weighted":
            self.weights_ = prior if self.rule == "best-head" else temps / n_heads
            return self

        def objective(w):
            P = softmax(np.einsum("nhc,h->nc", L, w))
            loss = -np.mean(np.log(np.maximum(P[rows, y], 1e-300))) + self.l2 * np.sum((w - prior) ** 2)
            G = P
            G[rows, y] -= 1.0
            return loss, np.einsum("nc,nhc->h", G, L) / n + 2 * self.l2 * (w - prior)

        res = minimize(objective, prior.copy(), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * n_heads)
        self.weights_ = res.x
        return self

    def weights_for(self, heads: list[int]) -> np.ndarray:
        """Weights to fuse only ``heads`` (indices): the learned ones, unless the heads that
        carried the weight are missing (the subset holds under half of it); then each head
        at its own calibrated temperature, averaged."""
        heads = list(heads)
        w = self.weights_[heads]
        if w.sum() >= 0.5 * self.weights_.sum():
            return w
        return self.temperatures_[heads] / len(heads)

    def predict_proba(self, log_probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        w = self.weights_ if weights is None else weights
        return softmax(np.einsum("nhc,h->nc", np.asarray(log_probs, dtype=np.float64), w))


FUSION_RULES = ("weighted", "best-head", "average")
_L2_ROWS = 120  # rows at which fusion_l2 is the pull (the digits demo's training labels); it grows as 1/rows


@dataclass(frozen=True)
class FusionChoice:
    """What :func:`choose_fusion` decided.

    Attributes
    ----------
    fusion : WeightedFusion
        The chosen rule fitted on every usable row.
    rule : str
        ``weighted``, ``best-head``, ``average``, or ``graph-head`` (no row could be scored).
    scores : dict of rule -> {"accuracy", "nll", "rows"}
        Each rule's score over the usable rows, each row fused by the rule fitted without its group.
    nested : ndarray of shape (n_rows, n_classes)
        The chosen rule's prediction of every row, fitted without that row's group.
    """

    fusion: WeightedFusion
    rule: str
    scores: dict
    nested: np.ndarray


def choose_fusion(log_probs: np.ndarray, y: np.ndarray, group: np.ndarray, usable: np.ndarray, *, l2: float,
                  fallback: int | None = None) -> FusionChoice:
    """Pick how to fuse the heads by a cross-validated score over every label.

    Each candidate rule (:data:`FUSION_RULES`: learned weights, the best head alone, the
    calibrated average) is fitted on the usable rows of all groups but one and predicts that
    group. Every rule whose accuracy over the usable rows is within one standard error of
    the best is in the running, and the one with the lowest held-out log loss wins. With few labels the learned weights can't be told from noise and a simpler rule
    wins, so the fused output is not measurably worse than its best head. The weights' pull
    toward the best head is ``l2 * 120 / rows``: a prior of fixed strength, which the
    evidence outweighs as labels grow.

    Parameters
    ----------
    log_probs : ndarray of shape (n_rows, n_heads, n_classes)
        Each head's held-out log-probabilities of the labeled rows.
    y : ndarray of shape (n_rows,)
    group : ndarray of shape (n_rows,)
        The fold of each row (the heads that predicted it did not see the labels of its group).
    usable : ndarray of bool, shape (n_rows,)
        Rows whose prediction says something (the heads kept a label of its class).
    fallback : int, optional
        The head used alone when no row is usable (one label per class); None: the average.
    """
    L = np.asarray(log_probs, dtype=np.float64)
    n, n_heads, n_classes = L.shape
    rows = np.flatnonzero(usable)
    if len(rows) == 0 or len(np.unique(y[rows])) < 2:
        fusion = WeightedFusion(l2, "average")
        fusion.temperatures_, fusion.best_head_ = np.ones(n_heads), 0 if fallback is None else fallback
        fusion.weights_ = np.ones(n_heads) / n_heads
        rule = "average"
        if fallback is not None:
            fusion.weights_ = np.eye(n_heads)[fallback]
            fusion.rule, rule = "best-head", "graph-head"
        return FusionChoice(fusion, rule, {}, fusion.predict_proba(L))
    l2 = l2 * _L2_ROWS / len(rows)
    scores, nested = {}, {}
    for rule in FUSION_RULES:
        out = np.empty((n, n_classes))
        for g in np.unique(group):
            fit_rows = rows[group[rows] != g]
            at = group == g
            if len(fit_rows) == 0 or len(np.unique(y[fit_rows])) < 2:
                fit_rows = rows  # a single group: scored in sample
            out[at] = WeightedFusion(l2, rule).fit(L[fit_rows], y[fit_rows]).predict_proba(L[at])
        p_true = out[rows, y[rows]]
        scores[rule] = {"accuracy": float(np.mean(np.argmax(out[rows], axis=1) == y[rows])),
                        "nll": float(-np.mean(np.log(np.maximum(p_true, 1e-12)))), "rows": int(len(rows))}
        nested[rule] = out
    # accuracies over a few dozen rows differ by a row or two by chance: every rule within one standard error
    # of the most accurate is in the running, and the lowest held-out log loss among them wins (ties: the
    # earlier rule); on a 10-class mixture at 5 labels per class the most accurate rule by one row scored
    # 0.844 on the pool, the lowest-loss one 0.882
    top = max(scores[r]["accuracy"] for r in FUSION_RULES)
    slack = np.sqrt(top * (1.0 - top) / len(rows))
    running = [r for r in FUSION_RULES if scores[r]["accuracy"] >= top - slack - 1e-12]
    best = min(running, key=lambda r: scores[r]["nll"])
    return FusionChoice(WeightedFusion(l2, best).fit(L[rows], y[rows]), best, scores, nested[best])


_PRIOR_SAMPLE = 20_000  # unlabeled rows the pool's class proportions are estimated from


def _label_priors(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Class proportions of the labels; a class without labels gets a small share, not zero."""
    counts = np.bincount(y[y >= 0], minlength=n_classes).astype(np.float64)
    counts = np.maximum(counts, 0.5 * counts[counts > 0].min())
    return counts / counts.sum()


def _class_kept(y: np.ndarray, train_idx: np.ndarray, folds: np.ndarray, n_folds: int) -> np.ndarray:
    """For each training row: whether its class kept a label in the fit that predicted it out of fold."""
    if n_folds == 0:
        return np.zeros(len(train_idx), dtype=bool)
    labels = y[train_idx]
    kept = np.zeros(len(train_idx), dtype=bool)
    for f in range(n_folds):
        at = folds == f
        others = set(np.unique(labels[~at]).tolist())
        kept[at] = np.isin(labels[at], list(others))
    return kept


def head_proba(head, X: np.ndarray, n_classes: int, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """A head's probabilities over all ``n_classes`` class indices, float32 (n_samples, n_classes).

    Rows with ``fit_rows >= 0`` take the head's transductive soft label of that fitted row
    when it has one (``label_distributions_``), the others go through ``predict_proba``.
    Classes the head never saw get probability 0. When no row has a soft label the head
    gets ``X`` itself (no copy; inside :func:`~clipfuse.classify.base.prepared_rows` it
    also skips its checks), else the rows it must answer for, taken once per block.
    """
    out = np.zeros((len(X), n_classes), dtype=np.float32)
    cols = np.asarray(head.classes_)
    done = None
    if fit_rows is not None and hasattr(head, "label_distributions_"):
        fit_rows = np.asarray(fit_rows)
        done = fit_rows >= 0
        out[np.ix_(done, cols)] = head.label_distributions_[fit_rows[done]]
    if done is None or not done.any():
        out[:, cols] = head.predict_proba(X)
    elif not done.all():
        out[np.ix_(~done, cols)] = head.predict_proba(take_rows(X, np.flatnonzero(~done)))
    return out


def _log(P: np.ndarray) -> np.ndarray:
    """Log-probabilities with a floor, renormalised so that zero-probability classes stay finite."""
    P = np.maximum(np.asarray(P, dtype=np.float64), _EPS)
    return np.log(P / P.sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class ViewRows:
    """One view of the shared rows of a multi-view :class:`Ensemble` (one embedding version).

    Attributes
    ----------
    X : ndarray of shape (n_view, dim), float32
        The view's vectors.
    rows : ndarray of shape (n_view,), int
        The shared row of each vector: row ``rows[i]`` of ``y`` (at fit) or of the output
        (at predict). A shared row the view lacks has no vector here.
    fit_rows : ndarray of shape (n_view,), int, optional
        At predict time, the row of each vector in the view's fitted matrix (-1 for rows
        added since), so that transductive heads answer with their propagated labels.
    """

    X: np.ndarray
    rows: np.ndarray
    fit_rows: np.ndarray | None = None


def _uniform(n: int, n_classes: int) -> np.ndarray:
    """Chance probabilities: what a view that lacks a row contributes to the fusion (a constant
    log-probability, which the softmax ignores)."""
    return np.full((n, n_classes), 1.0 / n_classes)


def _fold_ids(y: np.ndarray, rows: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold number of each of ``rows``, dealt round-robin within each class after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(rows), dtype=np.int64)
    offset = 0
    for c in np.unique(y[rows]):
        mine = np.flatnonzero(y[rows] == c)
        rng.shuffle(mine)
        folds[mine] = (np.arange(len(mine)) + offset) % n_folds
        offset += len(mine)  # rotate the start so small classes do not all land in fold 0
    return folds


class Ensemble:
    """Heads plus their learned fusion, fitted on one matrix of embeddings (or several views of
    the same rows).

    ``fit`` splits the labeled rows with the seeded 80/20 split. The fusion weights are
    learned on out-of-fold predictions over the *train* rows: each head is fitted
    ``n_folds`` times with one fold's labels hidden and predicts that fold. Each head is
    then fitted on the whole train split and scored on the validation rows, which neither
    the heads nor the fusion have seen, so the per-head and fused validation scores are
    honest. With ``refit`` the heads are finally refitted on every label; the fusion
    weights carry over. Transductive heads see every row at every fit (their neighbour
    graph and clusters are computed once and reused), only the labels change. ``X`` is
    checked, L2-normalised and hashed once per fit (see
    :func:`~clipfuse.classify.base.prepared_rows`), not once per head and fold.

    With ``views`` the heads are members of several views of the same rows (e.g. one
    embedding version per CLIP model): each member is fitted on its view's vectors, all
    members share one split and one set of folds, and one fusion learns a weight per
    member. A row that a view lacks gets chance probabilities from that view's members in
    the out-of-fold and validation predictions; at predict time it is fused from the views
    that hold it.

    A head that cannot run (e.g. zero-shot with no text embeddings) is recorded in
    ``unavailable_`` and the rest go on.

    Parameters
    ----------
    heads : dict of name -> estimator
    n_classes : int
    views : dict of name -> str, optional
        The view of each head (its key in the ``X`` mapping of :meth:`fit` and
        :meth:`predict_proba`); None fits every head on one matrix.
    val_fraction, seed : split of the labeled rows
    n_folds : int, default=3
        Folds of the out-of-fold predictions the fusion learns from.
    refit : bool, default=True
    fusion_l2 : float, default=0.03
        Pull of the fusion weights toward the best single head, see :class:`WeightedFusion`.
    pool_priors : bool, default=True
        Move the fused predictions of the pool from the labels' class proportions to the
        pool's, estimated by EM (:func:`~clipfuse.classify.priors.estimate_priors`). The
        held-out scores stay unmoved: held-out labels have the labels' proportions.

    Attributes
    ----------
    label_priors_ : ndarray of shape (n_classes,)
        Class proportions of the labels (what the fused probabilities are calibrated under).
    pool_priors_ : ndarray of shape (n_classes,)
        Estimated class proportions of the unlabeled rows (``label_priors_`` when none).
    priors_applied_ : bool
        Whether the estimate moves the pool's predictions: only when the fused probabilities
        were calibrated on a held-out row per class or more, and the estimate agrees with the
        shares of the predicted classes better than the labels' proportions do; otherwise it
        is only reported.
    view_rows_ : dict of view -> ndarray of int
        With ``views``: the shared rows each view held at fit time.
    view_scores_ : dict of view -> dict
        With ``views``: validation scores of a fusion of that view's members alone (what
        the view would score without the others).
    """

    def __init__(self, heads: dict, n_classes: int, *, views: dict[str, str] | None = None, val_fraction: float = 0.2,
                 seed: int = 0, n_folds: int = 3, refit: bool = True, fusion_l2: float = 0.03,
                 pool_priors: bool = True):
        self.heads = dict(heads)
        self.n_classes = n_classes
        self.views = None if views is None else dict(views)
        self.val_fraction = val_fraction
        self.seed = seed
        self.n_folds = n_folds
        self.refit = refit
        self.fusion_l2 = fusion_l2
        self.pool_priors = pool_priors

    def _view_of(self, name: str):
        return None if self.views is None else self.views[name]

    def _check_views(self, X, n_rows: int) -> dict:
        """``X`` as {view: ViewRows}: one matrix is the single view ``None`` of every row."""
        if self.views is None:
            if isinstance(X, Mapping):
                raise ValueError("this ensemble has one view: pass X as one (n, dim) array, not a mapping of views.")
            return {None: ViewRows(X, np.arange(n_rows))}
        if not isinstance(X, Mapping):
            raise ValueError(f"this ensemble's heads belong to views {', '.join(sorted(set(self.views.values())))}: "
                             "pass X as a mapping view -> ViewRows.")
        wanted = set(self.views.values())
        missing = sorted(wanted - set(X))
        if missing:
            raise ValueError(f"no rows given for view(s) {', '.join(missing)}; the heads need "
                             f"{', '.join(sorted(wanted))}.")
        views = {}
        for view in [v for v in dict.fromkeys(self.views.values())]:
            vr = X[view]
            rows = np.asarray(vr.rows, dtype=np.int64)
            if rows.ndim != 1 or len(rows) != len(vr.X):
                raise ValueError(f"view {view!r}: rows must be one index per vector ({len(vr.X)}); got shape "
                                 f"{rows.shape}.")
            if len(rows) and (rows.min() < 0 or rows.max() >= n_rows or len(np.unique(rows)) != len(rows)):
                raise ValueError(f"view {view!r}: rows must be distinct indices in [0, {n_rows}).")
            views[view] = ViewRows(vr.X, rows, vr.fit_rows)
        return views

    def fit(self, X, y: np.ndarray, *, progress=None) -> Ensemble:
        """Fit heads and fusion on ``X`` (n, dim) with labels ``y`` (class index, -1 unlabeled).

        With ``views``, ``X`` maps each view to its :class:`ViewRows` (rows index ``y``).
        ``progress(head, stage, step, total)`` is called before each head fit, if given.
        """
        y = np.asarray(y, dtype=np.int64)
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be at least 2; got {self.n_folds}.")
        if not np.any(y >= 0):
            raise ValueError("No labeled rows: label some images (class folders) before training heads.")
        if y.max() >= self.n_classes:
            raise ValueError(f"Labels go up to {y.max()}, but n_classes is {self.n_classes}.")
        if len(np.unique(y[y >= 0])) < 2:
            raise ValueError(
                f"Only one class (index {int(y[y >= 0][0])}) has labeled images: telling classes apart needs "
                "labeled images of at least two. Add another class folder (LABELED_DIR/<class>/<image>) and index it."
            )
        views = self._check_views(X, len(y))
        train_idx, val_idx = split_labeled(y, val_fraction=self.val_fraction, seed=self.seed)
        # one label per class: nothing can be held out, so there are no folds and no validation rows;
        # each head is fitted once on every label and the fusion falls back to its label-free rule
        n_folds = self.n_folds if len(val_idx) else 0
        if n_folds and len(train_idx) < n_folds:
            raise ValueError(f"{len(train_idx)} training label(s) can't fill {n_folds} folds; label more "
                             "images or lower the number of folds.")
        folds = _fold_ids(y, train_idx, max(n_folds, 1), self.seed)
        y_train = np.full_like(y, -1)
        y_train[train_idx] = y[train_idx]
        self.train_idx_, self.val_idx_, self.val_labels_ = train_idx, val_idx, y[val_idx]
        self.train_labels_ = y[train_idx]
        self.unavailable_: dict[str, str] = {}
        self.fit_seconds_: dict[str, float] = {}
        oof: dict[str, np.ndarray] = {}
        val_proba: dict[str, np.ndarray] = {}
        total = n_folds + 1 + int(self.refit and n_folds > 0)
        C = self.n_classes
        for view, vr in views.items():
            # position of each shared row in this view (-1: the view lacks it)
            pos = np.full(len(y), -1, dtype=np.int64)
            pos[vr.rows] = np.arange(len(vr.rows))
            members = [name for name in self.heads if self._view_of(name) == view]
            # X checked, normalised and hashed once per view; each fold's held-out rows taken once for all heads
            with prepared_rows(vr.X, estimator=self):
                held_classes = len(np.unique(y_train[vr.rows][y_train[vr.rows] >= 0]))
                for name in members:
                    head = self.heads[name]
                    start = time.perf_counter()
                    if held_classes < 2:  # e.g. an embedding version made before the labeled images were indexed
                        self.unavailable_[name] = (f"view {view} holds training labels of {held_classes} class(es); "
                                                   "a head needs two or more")
                        continue
                    try:
                        out = _uniform(len(train_idx), C)
                        for f in range(n_folds):
                            if progress:
                                progress(name, f"fold {f + 1}/{n_folds}", f, total)
                            at = np.flatnonzero(folds == f)
                            held = pos[train_idx[at]]
                            held_ok = held >= 0
                            y_fold = y_train[vr.rows]
                            y_fold[held[held_ok]] = -1
                            if len(np.unique(y_fold[y_fold >= 0])) < 2:
                                continue  # the view holds too few of this fold's labels: chance for the fold
                            head.fit(vr.X, y_fold)
                            if held_ok.any():
                                out[at[held_ok]] = head_proba(head, take_rows(vr.X, held[held_ok]), C, held[held_ok])
                        if progress:
                            progress(name, "train split" if n_folds else "all labels", n_folds, total)
                        head.fit(vr.X, y_train[vr.rows])
                    except HeadUnavailableError as e:
                        self.unavailable_[name] = str(e)
                        continue
                    oof[name] = out
                    val_rows = pos[val_idx]
                    val_ok = val_rows >= 0
                    val_proba[name] = _uniform(len(val_idx), C).astype(np.float32)
                    if val_ok.any():
                        val_proba[name][val_ok] = head_proba(head, take_rows(vr.X, val_rows[val_ok]), C,
                                                             val_rows[val_ok])
                    if self.refit and n_folds:  # without folds the train split is every label already
                        if progress:
                            progress(name, "all labels", n_folds + 1, total)
                        head.fit(vr.X, y[vr.rows])
                    self.fit_seconds_[name] = time.perf_counter() - start
        if not oof:
            raise ValueError("No head could run: " + "; ".join(f"{k}: {v}" for k, v in self.unavailable_.items()))
        self.head_names_ = [h for h in self.heads if h in oof]  # the given order, views interleaved as given
        self.heads = {h: self.heads[h] for h in self.head_names_}
        start = time.perf_counter()
        L_train = np.stack([_log(oof[h]) for h in self.head_names_], axis=1)
        L_val = np.stack([_log(val_proba[h]) for h in self.head_names_], axis=1)
        y_val = y[val_idx]
        self.oof_proba_ = oof
        # every label, each predicted by heads that did not see it: the training rows out of fold, the
        # validation rows by the heads of the train split; rows whose class kept no label in their fold's fit
        # say nothing about the heads and are left out
        L_all = np.concatenate([L_train, L_val])
        y_all = np.concatenate([y[train_idx], y_val])
        group = np.concatenate([folds, np.full(len(val_idx), max(n_folds, 1))])
        usable = np.concatenate([_class_kept(y, train_idx, folds, n_folds), np.ones(len(val_idx), bool)])
        choice = choose_fusion(L_all, y_all, group, usable, l2=self.fusion_l2,
                               fallback=self._label_free_head())
        self.fusion_, self.fusion_rule_, self.rule_scores_ = choice.fusion, choice.rule, choice.scores
        nested = choice.nested  # each row fused by a rule fitted without its group
        n_train = len(train_idx)
        # temperature scaling of the fused output, fitted on the training rows' nested predictions; the
        # validation rows stay out of it, so its ECE there is honest
        fit_on = np.flatnonzero(usable[:n_train])
        self.temperature_ = fit_temperature(_log(nested[fit_on]), y_all[fit_on]) if len(fit_on) else 1.0
        self.oof_fused_ = self._calibrate(nested[:n_train]).astype(np.float32)  # rows train_idx_, out of fold
        raw_val = nested[n_train:]
        self.val_fused_raw_ = raw_val.astype(np.float32)  # before temperature scaling, for the ECE it changes
        self.val_proba_ = {**val_proba, "fused": self._calibrate(raw_val)}
        self.val_scores_ = ({h: score_predictions(y_val, P) for h, P in self.val_proba_.items()}
                            if len(val_idx) else {})
        self.view_rows_ = {} if self.views is None else {view: vr.rows for view, vr in views.items()}
        self.view_scores_ = {}
        if self.views is not None:
            for view in views:
                cols = [i for i, h in enumerate(self.head_names_) if self._view_of(h) == view]
                if cols and len(val_idx):
                    alone = WeightedFusion(self.fusion_l2).fit(L_train[:, cols], y[train_idx])
                    self.view_scores_[view] = score_predictions(y_val, alone.predict_proba(L_val[:, cols]))
        self.label_priors_ = _label_priors(y, self.n_classes)
        self.pool_priors_, hard = self._estimate_pool_priors(X, y)
        # EM trusts the probabilities' calibration, fitted on held-out rows whose heads saw fewer labels than
        # the final ones: too flat on the pool, EM can run off (3 labels per class of a balanced 10-class pool:
        # 0.9 of the mass on one class, accuracy 0.52 -> 0.10). The estimate is applied only when the fused
        # probabilities were calibrated on a row per class or more and it agrees with the pool's predicted
        # classes better than the labels' proportions do (a skewed pool skews the predictions the same way)
        self.priors_applied_ = bool(len(fit_on) >= self.n_classes and hard is not None and
                                    total_variation(self.pool_priors_, hard) < total_variation(self.label_priors_, hard))
        self.fit_seconds_["fusion"] = time.perf_counter() - start
        return self

    def _estimate_pool_priors(self, X, y: np.ndarray) -> np.ndarray:
        """EM estimate of the unlabeled rows' class proportions from the fused, calibrated predictions
        of a seeded sample of them (at most ``_PRIOR_SAMPLE``; transductive heads answer with their
        propagated labels), and the shares of the sample's predicted classes (None without a sample)."""
        unlabeled = np.flatnonzero(y < 0)
        if len(unlabeled) == 0:
            return self.label_priors_.copy(), None
        if len(unlabeled) > _PRIOR_SAMPLE:
            unlabeled = np.sort(np.random.default_rng(self.seed).choice(unlabeled, _PRIOR_SAMPLE, replace=False))
        if self.views is None:
            P, _ = self.predict_proba(take_rows(X, unlabeled), fit_rows=unlabeled, shift=False)
        else:
            local = np.full(len(y), -1, dtype=np.int64)
            local[unlabeled] = np.arange(len(unlabeled))
            sub = {}
            for view, vr in self._check_views(X, len(y)).items():
                keep = np.flatnonzero(local[vr.rows] >= 0)
                sub[view] = ViewRows(take_rows(vr.X, keep), local[vr.rows[keep]], keep)
            P, _ = self.predict_proba(sub, n_rows=len(unlabeled), shift=False)
        hard = np.bincount(P.argmax(axis=1), minlength=self.n_classes) / len(P)
        return estimate_priors(P, self.label_priors_), hard

    def to_pool_priors(self, P: np.ndarray) -> np.ndarray:
        """Fused probabilities predicted with ``shift=False`` moved to the pool's estimated class
        proportions, as ``predict_proba`` moves them (unchanged when the estimate is not applied)."""
        priors = self.prior_shift()
        return P if priors is None else adjust_priors(P, *priors).astype(np.float32)

    def prior_shift(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(labels' proportions, pool's proportions) when predictions are moved between them, else None
        (``pool_priors`` off, or the estimate not trusted: see ``priors_applied_``)."""
        pool, labels = getattr(self, "pool_priors_", None), getattr(self, "label_priors_", None)
        if not self.pool_priors or pool is None or labels is None or not getattr(self, "priors_applied_", False):
            return None
        return labels, pool

    def _label_free_head(self) -> int | None:
        """The head the fusion uses alone when no label can be held out (one per class): the graph
        head, the method built for the lowest label rates (Poisson learning at one label per class)."""
        graph = [i for i, h in enumerate(self.head_names_) if h.rpartition("/")[2] == "propagation"]
        return graph[0] if graph else None

    def _calibrate(self, P: np.ndarray) -> np.ndarray:
        """Fused probabilities at the temperature fitted on the out-of-fold rows (argmax unchanged)."""
        t = getattr(self, "temperature_", 1.0)
        return P if t == 1.0 else softmax(t * _log(P))

    def held_out_proba(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(rows, labels, P)`` of every labeled row, each predicted by heads that did not see its label:
        the training rows out of fold, the validation rows by the heads fitted on the training split.
        None for heads saved before these predictions were kept."""
        oof = getattr(self, "oof_fused_", None)
        if oof is None:
            return None
        rows = np.concatenate([self.train_idx_, self.val_idx_])
        labels = np.concatenate([self.train_labels_, self.val_labels_])
        return rows, labels, np.concatenate([oof, self.val_proba_["fused"]]).astype(np.float64)

    @property
    def weights_(self) -> dict[str, float]:
        """Learned fusion weight of each head."""
        return dict(zip(self.head_names_, map(float, self.fusion_.weights_)))

    def predict_proba(self, X, *, fit_rows: np.ndarray | None = None, heads: list[str] | None = None,
                      n_rows: int | None = None, shift: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused and per-head probabilities for ``X`` (n, dim).

        ``fit_rows[i]`` is the row of ``X[i]`` in the fitted matrix (-1 for new rows): it
        lets transductive heads answer with their propagated labels. ``heads`` limits the
        fusion to those heads (see :meth:`WeightedFusion.weights_for`). With ``views``,
        ``X`` maps each view to its :class:`ViewRows` (with ``fit_rows``) and ``n_rows``
        is the number of output rows; a head's rows that its view lacks are NaN in
        ``per_head`` and left out of the fusion. With ``shift`` (and ``pool_priors``) the
        fused probabilities are moved to the pool's estimated class proportions.

        Returns
        -------
        fused : ndarray of shape (n_samples, n_classes), float32
        per_head : dict of name -> ndarray of shape (n_samples, n_classes), float32
        """
        unknown = [h for h in heads or () if h not in self.head_names_ and h not in self.unavailable_]
        if unknown:
            raise ValueError(f"unknown head(s) {', '.join(unknown)}; fitted heads: {', '.join(self.head_names_)}.")
        names = [h for h in self.head_names_ if heads is None or h in heads]
        if not names:
            raise ValueError(f"None of the heads {heads} is fitted; fitted heads: {', '.join(self.head_names_)}.")
        if self.views is None:
            n_rows = len(X)
            views = {None: ViewRows(X, None, fit_rows)}
        else:
            if n_rows is None:
                raise ValueError("n_rows is needed to predict from views: the number of output rows.")
            views = self._check_views(X, n_rows)
        C = self.n_classes
        per_head: dict[str, np.ndarray] = {}
        for view, vr in views.items():
            members = [h for h in names if self._view_of(h) == view]
            if not members:
                continue
            if len(vr.X) == 0:
                per_head.update({h: np.full((n_rows, C), np.nan, dtype=np.float32) for h in members})
                continue
            with prepared_rows(vr.X, estimator=self):  # checked and normalised once, not per head
                spread = vr.rows is not None and (len(vr.rows) != n_rows or np.any(vr.rows != np.arange(n_rows)))
                for h in members:
                    P = head_proba(self.heads[h], vr.X, C, vr.fit_rows)
                    if spread:
                        full = np.full((n_rows, C), np.nan, dtype=np.float32)
                        full[vr.rows] = P
                        P = full
                    per_head[h] = P
        per_head = {h: per_head[h] for h in names}
        fused = np.empty((n_rows, C), dtype=np.float32)
        priors = self.prior_shift() if shift else None
        if self.views is None:
            self._fuse(fused, per_head, names, np.arange(n_rows), priors)
            return fused, per_head
        # rows a view lacks are fused from the views that hold them, with the weights of those
        # members (or their calibrated average when the missing members carried the weight)
        present = np.zeros((n_rows, len(views)), dtype=bool)
        for j, vr in enumerate(views.values()):
            present[vr.rows, j] = True
        patterns, which = np.unique(present, axis=0, return_inverse=True)
        for k, pattern in enumerate(patterns):
            held = {view for view, p in zip(views, pattern) if p}
            members = [h for h in names if self._view_of(h) in held]
            if members:
                self._fuse(fused, per_head, members, np.flatnonzero(which.ravel() == k), priors)
            else:
                fused[which.ravel() == k] = 1.0 / C  # no chosen head's view holds these rows
        return fused, per_head

    def _fuse(self, fused: np.ndarray, per_head: dict, names: list[str], rows: np.ndarray, priors=None) -> None:
        """Write the fusion of ``names`` for ``rows`` into ``fused``, in bounded blocks; ``priors``:
        (from, to) class proportions to move the fused probabilities between."""
        w = self.fusion_.weights_for([self.head_names_.index(h) for h in names])
        everything = len(rows) == len(fused)
        for start in range(0, len(rows), 65_536):  # bounded temporaries at store scale
            at = slice(start, start + 65_536) if everything else rows[start:start + 65_536]
            L = np.stack([_log(per_head[h][at]) for h in names], axis=1)
            P = self._calibrate(self.fusion_.predict_proba(L, w))
            fused[at] = P if priors is None else adjust_priors(P, *priors)


def create_ensemble(names, n_classes: int, *, params: dict | None = None, **kwargs) -> Ensemble:
    """An :class:`Ensemble` of the registered heads ``names``; ``params[name]`` goes to that head."""
    params = params or {}
    return Ensemble({name: create_head(name, **params.get(name, {})) for name in names}, n_classes, **kwargs)


DEFAULT_HEADS = ("zero-shot", "finetuned", "probe", "knn", "propagation", "kmeans", "pseudo", "mean-teacher")
_TEXT_HEADS = ("zero-shot", "probe", "knn")  # heads that take class text embeddings


@dataclass(frozen=True)
class HeadsConfig:
    """Everything `train-heads` decides; written as config.json beside the saved heads."""

    heads: tuple[str, ...] = DEFAULT_HEADS  # registered head names to fit
    val_fraction: float = 0.2  # share of each class's labels held out for validation
    seed: int = 0  # seed of the validation split, the folds and every head
    n_folds: int = 3  # folds of the out-of-fold predictions the fusion learns from
    refit: bool = True  # refit the heads on every label once validated
    fusion_l2: float = 0.03  # pull of the fusion weights toward the best single head
    pool_priors: bool = True  # move pool predictions to the pool's estimated class proportions
    graph: str = "auto"  # neighbour graph of label propagation: auto, exact, ivf, hnsw
    n_neighbors: int | str = "auto"  # neighbours per row in that graph
    probe_zero_shot_prior: bool = False  # regularise the linear probe toward the zero-shot weights
    class_words: str | tuple[str, ...] | None = None  # YAML/JSON file(s) of class words; None = folder names

    def __post_init__(self):
        from clipfuse.classify.base import list_heads

        unknown = [h for h in self.heads if h not in list_heads()]
        if unknown or not self.heads:
            raise ValueError(f"unknown head(s) {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(list_heads())}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")

    @property
    def word_lists(self) -> tuple[str, ...]:
        """The class-words files, in order (empty: the folder names)."""
        if self.class_words is None:
            return ()
        return (self.class_words,) if isinstance(self.class_words, str) else tuple(self.class_words)


def _mean_unit(arrays) -> np.ndarray:
    """The renormalised mean of several (n_classes, dim) class embeddings, as prompt ensembling averages."""
    M = np.mean(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]), axis=0)
    return M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-12)


def create_heads_from_config(config: HeadsConfig, class_embeddings=None, finetuned_head: np.ndarray | None = None,
                             finetuned_bias: np.ndarray | None = None) -> dict:
    """The heads a config describes, by name (unfitted).

    ``class_embeddings`` (n_classes, dim) go to the text-aware heads; a dict of
    list name -> embeddings gives one zero-shot head per word list (``zero-shot:<name>``,
    with a single list just ``zero-shot``) and the linear probe and kNN cache their
    renormalised mean. ``finetuned_head`` (and its bias, for the linear layer of an
    image-only backbone) is the classifier saved with a finetuned model.
    """
    lists = dict(class_embeddings) if isinstance(class_embeddings, Mapping) else None
    if lists is not None and not lists:
        lists, class_embeddings = None, None
    shared = (class_embeddings if lists is None else _mean_unit(lists.values()))
    heads: dict = {}
    for name in config.heads:
        params: dict = {}
        if name == "zero-shot" and lists is not None and len(lists) > 1:
            for list_name, emb in lists.items():
                heads[f"zero-shot:{list_name}"] = create_head(name, class_embeddings=emb)
            continue
        if name == "finetuned":
            params.update(class_embeddings=finetuned_head, bias=finetuned_bias)
        if name in _TEXT_HEADS:
            params["class_embeddings"] = shared
        if name == "probe":
            params["zero_shot_prior"] = config.probe_zero_shot_prior and shared is not None
        if name == "propagation":
            params.update(graph=config.graph, n_neighbors=config.n_neighbors, random_state=config.seed)
        if name in ("kmeans", "pseudo", "mean-teacher"):
            params["random_state"] = config.seed
        heads[name] = create_head(name, **params)
    return heads


def create_ensemble_from_config(config: HeadsConfig, n_classes: int, class_embeddings=None,
                                finetuned_head: np.ndarray | None = None,
                                finetuned_bias: np.ndarray | None = None, *,
                                views: dict[str, dict] | None = None) -> Ensemble:
    """The :class:`Ensemble` a config describes (see :func:`create_heads_from_config`).

    ``views`` maps a view name to the keyword arguments of :func:`create_heads_from_config`
    for that view (``class_embeddings``, ``finetuned_head``, ``finetuned_bias``): every
    configured head is made once per view, named ``<view>/<head>``.
    """
    kwargs = dict(val_fraction=config.val_fraction, seed=config.seed, n_folds=config.n_folds,
                  refit=config.refit, fusion_l2=config.fusion_l2, pool_priors=config.pool_priors)
    if views is None:
        return Ensemble(create_heads_from_config(config, class_embeddings, finetuned_head, finetuned_bias),
                        n_classes, **kwargs)
    heads, member_views = {}, {}
    for view, given in views.items():
        for name, head in create_heads_from_config(config, **given).items():
            heads[f"{view}/{name}"] = head
            member_views[f"{view}/{name}"] = view
    return Ensemble(heads, n_classes, views=member_views, **kwargs)


# --- persistence: parameters as JSON, arrays as safetensors; nothing is unpickled -------------

_EXTERNAL = ("X_fit_",)  # large arrays the caller re-supplies instead of saving a second copy


def _split_state(obj, prefix: str, arrays: dict) -> dict:
    """JSON-able description of ``obj``'s params and fitted attributes; arrays go to ``arrays``."""
    state = {}
    items = [("param", k, v) for k, v in obj.get_params(deep=False).items()] + [
        ("attr", k, v) for k, v in vars(obj).items() if k.endswith("_") and not k.startswith("_")]
    for kind, key, value in items:
        name = f"{prefix}{kind}.{key}"
        if key in _EXTERNAL:
            state[f"{kind}:{key}"] = {"external": True}
        elif isinstance(value, np.ndarray):
            arrays[name] = np.ascontiguousarray(value)
            state[f"{kind}:{key}"] = {"array": name}
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            for sub, v in value.items():
                arrays[f"{name}.{sub}"] = np.ascontiguousarray(v)
            state[f"{kind}:{key}"] = {"arrays": {sub: f"{name}.{sub}" for sub in value}}
        elif isinstance(value, (np.integer, np.floating)):
            state[f"{kind}:{key}"] = {"value": value.item()}
        else:
            state[f"{kind}:{key}"] = {"value": value}
    return state


def save_ensemble(ensemble: Ensemble, folder: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``ensemble.json`` and ``ensemble.safetensors`` into ``folder`` (replaced atomically)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    heads = {name: {"head": getattr(type(head), "head_name", name), "state": _split_state(head, f"{name}.", arrays)}
             for name, head in ensemble.heads.items()}
    for view, rows in getattr(ensemble, "view_rows_", {}).items():
        arrays[f"_view_rows.{view}"] = np.asarray(rows, dtype=np.int64)
    for name, proba in ensemble.val_proba_.items():
        arrays[f"_val.{name}"] = np.ascontiguousarray(proba)
    arrays["_val_rows"] = np.asarray(ensemble.val_idx_, dtype=np.int64)
    arrays["_val_labels"] = np.asarray(ensemble.val_labels_, dtype=np.int64)
    arrays["_train_rows"] = np.asarray(ensemble.train_idx_, dtype=np.int64)
    if getattr(ensemble, "oof_fused_", None) is not None:
        arrays["_oof_fused"] = np.ascontiguousarray(ensemble.oof_fused_, dtype=np.float32)
        arrays["_train_labels"] = np.asarray(ensemble.train_labels_, dtype=np.int64)
    for attr in ("label_priors_", "pool_priors_"):
        if getattr(ensemble, attr, None) is not None:
            arrays[f"_{attr}"] = np.asarray(getattr(ensemble, attr), dtype=np.float64)
    if getattr(ensemble, "val_fused_raw_", None) is not None:
        arrays["_val_fused_raw"] = np.ascontiguousarray(ensemble.val_fused_raw_, dtype=np.float32)
    meta = {
        "format": 1,
        "n_classes": ensemble.n_classes,
        "val_fraction": ensemble.val_fraction,
        "seed": ensemble.seed,
        "n_folds": ensemble.n_folds,
        "refit": ensemble.refit,
        "fusion_l2": ensemble.fusion_l2,
        "pool_priors": ensemble.pool_priors,
        "priors_applied": bool(getattr(ensemble, "priors_applied_", False)),
        "views": ensemble.views,
        "view_scores": getattr(ensemble, "view_scores_", {}),
        "weights": ensemble.weights_,
        "fusion_rule": getattr(ensemble, "fusion_rule_", "weighted"),
        "rule_scores": getattr(ensemble, "rule_scores_", {}),
        "temperatures": dict(zip(ensemble.head_names_, map(float, ensemble.fusion_.temperatures_))),
        "calibration_temperature": float(getattr(ensemble, "temperature_", 1.0)),
        "unavailable": ensemble.unavailable_,
        "val_scores": ensemble.val_scores_,
        "fit_seconds": ensemble.fit_seconds_,
        "heads": heads,
        **(extra or {}),
    }
    # arrays first, the JSON that names them last: a reader never finds a JSON without its arrays
    write_with(folder / "ensemble.safetensors", lambda tmp: save_file(arrays, tmp))
    write_text_atomic(folder / "ensemble.json", json.dumps(meta, indent=2, allow_nan=True))
    return folder


def load_ensemble(folder: str | Path, *, external: dict | None = None) -> tuple[Ensemble, dict]:
    """Rebuild a saved :class:`Ensemble`; returns it and the saved metadata.

    ``external`` maps an attribute name in ``_EXTERNAL`` (``"X_fit_"``) to the array to
    restore (rows in the order they were fitted); for an ensemble of several views it maps
    each view to such a dict. Without it, transductive heads still answer for fitted rows
    but not for new ones.
    """
    from safetensors.numpy import load_file

    from clipfuse.classify.base import get_head_class

    folder = Path(folder)
    meta_path = folder / "ensemble.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"No trained heads in {folder}: run `clipfuse train-heads` first.")
    meta = json.loads(meta_path.read_text())
    arrays = load_file(str(folder / "ensemble.safetensors"))
    views = meta.get("views")
    heads = {}
    for name, spec in meta["heads"].items():
        params, attrs = {}, {}
        given = (external or {}).get(views[name], {}) if views else (external or {})
        for key, entry in spec["state"].items():
            kind, attr = key.split(":", 1)
            if "external" in entry:
                if attr in given:
                    attrs[attr] = given[attr]
                continue
            value = (arrays[entry["array"]] if "array" in entry else
                     {k: arrays[v] for k, v in entry["arrays"].items()} if "arrays" in entry else entry["value"])
            (params if kind == "param" else attrs)[attr] = value
        head = get_head_class(spec["head"])(**params)
        for attr, value in attrs.items():
            setattr(head, attr, value)
        heads[name] = head
    ens = Ensemble(heads, meta["n_classes"], views=views, val_fraction=meta["val_fraction"], seed=meta["seed"],
                   n_folds=meta["n_folds"], refit=meta["refit"], fusion_l2=meta["fusion_l2"],
                   pool_priors=meta.get("pool_priors", False))  # heads saved before the estimate: unmoved
    ens.head_names_ = list(heads)
    ens.fusion_rule_ = meta.get("fusion_rule", "weighted")  # heads saved before the choice: learned weights
    ens.rule_scores_ = meta.get("rule_scores", {})
    ens.fusion_ = WeightedFusion(meta["fusion_l2"], "weighted" if ens.fusion_rule_ == "graph-head"
                                 else ens.fusion_rule_)
    ens.fusion_.weights_ = np.array([meta["weights"][h] for h in heads])
    ens.fusion_.temperatures_ = np.array([meta["temperatures"][h] for h in heads])
    ens.unavailable_ = meta["unavailable"]
    ens.val_scores_ = meta["val_scores"]
    ens.fit_seconds_ = meta["fit_seconds"]
    ens.val_proba_ = {k[len("_val."):]: v for k, v in arrays.items() if k.startswith("_val.")}
    ens.val_idx_, ens.train_idx_, ens.val_labels_ = arrays["_val_rows"], arrays["_train_rows"], arrays["_val_labels"]
    if "_oof_fused" in arrays:  # heads saved before they were kept have none: held_out_proba() says so
        ens.oof_fused_, ens.train_labels_ = arrays["_oof_fused"], arrays["_train_labels"]
    ens.temperature_ = float(meta.get("calibration_temperature", 1.0))  # heads saved before it: uncalibrated
    ens.val_fused_raw_ = arrays.get("_val_fused_raw")
    for attr in ("label_priors_", "pool_priors_"):
        if f"_{attr}" in arrays:
            setattr(ens, attr, arrays[f"_{attr}"])
    ens.priors_applied_ = bool(meta.get("priors_applied", False))
    ens.view_rows_ = {k[len("_view_rows."):]: v for k, v in arrays.items() if k.startswith("_view_rows.")}
    ens.view_scores_ = meta.get("view_scores", {})
    return ens, meta
