"""Benchmark: how well ``clipfuse.classify.ood_scores`` separates planted distractors, and its cost.

Datasets (15 labels per class, never on a distractor; AUROC over the unlabeled rows, the
distractors the positives):
- imbalanced-64: 48 classes with Zipf sizes (size_c ∝ 1/(c+1), ~9,000 rows, >= 20 per class),
  3 sub-clusters each, plus 10 % distractor rows around 12 centres of their own drawn the
  same way (``bench/classify_scale.py``'s ``make_clustered`` style), 64 dims, noise 1.2;
- imbalanced-512: the same in 512 dims, noise 2.4 (classify_scale's noise);
- digits-holdout: scikit-learn's digits as unit pixel vectors, digits 0-6 the classes and
  7-9 the distractors (real data, another shape of distractor).

P comes from scikit-learn's LogisticRegression on the labeled rows (``--ensemble``: clipfuse's
default ensemble, ``fit`` + ``predict_proba(X, fit_rows=arange(n))``). Each variant is printed
as mean ± sd over the seeds: ``1 - max P`` and entropy alone, the kNN score alone for several
reference rules (and its rank mean with ``1 - max P``), and ``ood_scores`` (the kNN score's rank
mean with the entropy's) for several of its settings.

Timing: ``ood_scores`` on ``--time-n`` x 512 unit vectors (48 classes of make_clustered, random
probabilities), best of two runs.

    python bench/ood.py                       # ~1 min on 2 cores
    python bench/ood.py --seeds 0 --time-n 300000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark's data generator
import classify_scale  # noqa: E402
from semi_supervised import make_imbalanced  # noqa: E402  (the same pool as the accuracy bench)

from clipfuse.classify import ood_scores  # noqa: E402
from clipfuse.classify.ood import knn_distance, percentile_ranks, reference_rows  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, default=15, help="labels per class")
    p.add_argument("--datasets", nargs="+", default=["imbalanced-64", "imbalanced-512", "digits-holdout"])
    p.add_argument("--ensemble", action="store_true", help="P from clipfuse's default ensemble, not LogisticRegression")
    p.add_argument("--time-n", type=int, default=300_000, help="rows of the timing run (0: skip it)")
    return p.parse_args(argv)


def load(name: str, seed: int):
    if name == "imbalanced-64":
        return make_imbalanced(seed=seed)
    if name == "imbalanced-512":
        return make_imbalanced(dim=512, noise=2.4, seed=seed)
    if name == "digits-holdout":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
        ood = y >= 7
        return X, np.where(ood, -1, y), ood
    raise SystemExit(f"unknown dataset {name!r}")


def pick_labels(y: np.ndarray, ood: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.full(len(y), -1, dtype=np.int64)
    for c in np.unique(y[~ood]):
        rows = np.flatnonzero((y == c) & ~ood)
        out[rng.choice(rows, min(per_class, len(rows) - 1), replace=False)] = c
    return out


def probabilities(X, y_semi, n_classes: int, seed: int, ensemble: bool) -> np.ndarray:
    if ensemble:
        from clipfuse.classify import HeadsConfig, create_ensemble_from_config

        ens = create_ensemble_from_config(HeadsConfig(seed=seed), n_classes).fit(X, y_semi)
        return ens.predict_proba(X, fit_rows=np.arange(len(X)))[0]
    from sklearn.linear_model import LogisticRegression

    keep = y_semi >= 0
    return LogisticRegression(C=10.0, max_iter=3000).fit(X[keep], y_semi[keep]).predict_proba(X)


def variants(X, P, y_semi):
    """name -> score of every row."""
    msp = 1.0 - P.max(axis=1)
    out = {"1 - max P": msp, "entropy": -(P * np.log(np.clip(P, 1e-12, 1.0))).sum(axis=1)}
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        ref = reference_rows(P, y_semi, confident=share, max_reference=len(X))
        out[f"kNN alone, confident={share}, whole reference"] = knn_distance(X, ref, 10, n_components=None)
        out[f"rank mean, confident={share}, whole reference"] = (
            percentile_ranks(out[f"kNN alone, confident={share}, whole reference"]) + percentile_ranks(msp))
    for m in (1024, 2048, 4096):
        for comps in (None, 64, 128):
            out[f"ood_scores max_reference={m} n_components={comps}"] = ood_scores(
                X, P, y_semi, max_reference=m, n_components=comps)
    ref = reference_rows(P, y_semi, confident=0.5, max_reference=4096)
    knn = out["kNN alone, ood_scores' reference"] = knn_distance(X, ref, 10)
    out["max of the two ranks (ood_scores' kNN, 1 - max P)"] = np.maximum(percentile_ranks(knn), percentile_ranks(msp))
    out["rank mean with 1 - max P for the entropy"] = percentile_ranks(knn) + percentile_ranks(msp)
    for k in (5, 20):
        out[f"ood_scores n_neighbors={k}"] = ood_scores(X, P, y_semi, n_neighbors=k)
    out["ood_scores (defaults)"] = ood_scores(X, P, y_semi)
    return out


def time_it(n: int) -> None:
    X, _, _ = classify_scale.make_clustered(n, 512, 48, 4, 2.4, seed=0)
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.full(48, 0.2), n).astype(np.float32)
    y = np.full(n, -1)
    y[rng.choice(n, 720, replace=False)] = rng.integers(0, 48, 720)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        ood_scores(X, P, y)
        best = min(best, time.perf_counter() - t)
    print(f"timing: ood_scores on {n:,} x 512: {best:.2f} s (best of 2)")


def main(argv=None) -> None:
    from sklearn.metrics import roc_auc_score

    args = parse_args(argv)
    for name in args.datasets:
        scores = defaultdict(list)
        for seed in args.seeds:
            X, y, ood = load(name, seed)
            y_semi = pick_labels(y, ood, args.labels, seed)
            P = probabilities(X, y_semi, int(y.max()) + 1, seed, args.ensemble)
            unl = y_semi < 0
            for variant, s in variants(X, P, y_semi).items():
                scores[variant].append(roc_auc_score(ood[unl], s[unl]))
        print(f"== {name}: {len(X)} rows, {int(ood.sum())} distractors, AUROC over unlabeled rows, "
              f"seeds {args.seeds}, P from {'the clipfuse ensemble' if args.ensemble else 'LogisticRegression'}")
        for variant, v in scores.items():
            print(f"  {variant:55s} {np.mean(v):.3f} ± {np.std(v):.3f}")
    if args.time_n:
        time_it(args.time_n)


if __name__ == "__main__":
    main()
