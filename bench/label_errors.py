"""Benchmark: how well ``suspects`` finds flipped labels, against out-of-fold LabelSpreading.

15 labels per class, 10% of them flipped to another class, on two datasets:
- digits: scikit-learn's 1,797 handwritten digits as raw pixels (64-d, unit-normalised);
- mixture: a 48-class mixture of 4 sub-clusters per class in 512-d (as bench/classify_scale.py).

clipfuse: the vectors are imported into a fresh store, ``train_heads`` fits the stack (probe, knn,
propagation, kmeans, pseudo) with ``--folds 5``, ``suspects`` ranks every label. Baseline: sklearn's LabelSpreading,
out of fold (5 folds over the labels, each fold's labels hidden while it is predicted), ranked by
self-confidence. Both are scored by precision and recall in their top k, k = the number flipped
(so precision = recall). Printed per seed, side by side, and their means.

    python bench/label_errors.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark's data generator
import classify_scale  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, default=15, help="labels per class")
    p.add_argument("--flip", type=float, default=0.10, help="share of the labels flipped")
    p.add_argument("--mixture-n", type=int, default=20_000, help="rows of the 48-class mixture")
    p.add_argument("--heads", default="probe,knn,propagation,kmeans,pseudo")
    return p.parse_args(argv)


def datasets(args, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data.astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True) + 1e-12
    yield "digits", X, digits.target.astype(np.int64)
    X, y, _ = classify_scale.make_clustered(args.mixture_n, 512, 48, 4, 2.4, seed)
    yield "mixture", X, y


def plant(y: np.ndarray, per_class: int, flip: float, seed: int):
    """``(given, flipped rows)``: ``per_class`` labels per class, ``flip`` of them moved to another class."""
    rng = np.random.default_rng(seed)
    given = np.full_like(y, -1)
    classes = np.unique(y)
    for c in classes:
        given[rng.choice(np.flatnonzero(y == c), per_class, replace=False)] = c
    labeled = np.flatnonzero(given >= 0)
    flipped = rng.choice(labeled, int(round(flip * len(labeled))), replace=False)
    for i in flipped:
        given[i] = rng.choice(classes[classes != y[i]])
    return given, set(flipped.tolist())


def run_clipfuse(X, given, folder: Path, heads: str) -> list[int]:
    """Rows ranked by ``suspects`` (whole stack through the store)."""
    import polars as pl

    import clipfuse

    np.save(folder / "v.npy", X)
    pl.DataFrame({"id": [f"r{i:06d}" for i in range(len(X))],
                  "label": [None if c < 0 else f"class_{c:02d}" for c in given]}).write_parquet(folder / "m.parquet")
    ws = clipfuse.open(folder / "s.lance")
    ws.import_embeddings(folder / "v.npy", metadata=folder / "m.parquet")
    ws.train_heads(heads=heads, folds=5)  # each label judged by heads that saw 80% of the others
    result = ws.suspects(n=int(np.sum(given >= 0)))
    return [int(s.id[1:]) for s in result.suspects]


def run_spreading(X, given, seed: int, folds: int = 5) -> list[int]:
    """Labeled rows ranked by 1 - p(given), p from LabelSpreading with the row's fold hidden."""
    from sklearn.semi_supervised import LabelSpreading

    labeled = np.flatnonzero(given >= 0)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(labeled)) % folds
    score = np.zeros(len(labeled))
    for f in range(folds):
        hidden = labeled[fold == f]
        y = given.copy()
        y[hidden] = -1
        model = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.2, max_iter=100).fit(X, y)
        P = model.label_distributions_[hidden]
        col = {c: i for i, c in enumerate(model.classes_)}
        score[fold == f] = 1.0 - np.array([P[j, col[given[r]]] if given[r] in col else 0.0
                                           for j, r in enumerate(hidden)])
    return labeled[np.argsort(-score, kind="stable")].tolist()


def precision_at_k(ranked: list[int], flipped: set[int]) -> float:
    k = len(flipped)
    return len(set(ranked[:k]) & flipped) / k if k else float("nan")


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    results: dict[str, dict[str, list[float]]] = {}
    print(f"{args.labels} labels per class, {args.flip:.0%} flipped; precision = recall in the top k (k = flipped)")
    print(f"{'dataset':8} {'seed':>4} {'k':>4}  {'suspects':>9}  {'LabelSpreading OOF':>18}")
    for seed in args.seeds:
        for name, X, y in datasets(args, seed):
            given, flipped = plant(y, args.labels, args.flip, seed)
            with tempfile.TemporaryDirectory(prefix="clipfuse-label-errors-") as tmp:
                ours = precision_at_k(run_clipfuse(X, given, Path(tmp), args.heads), flipped)
            base = precision_at_k(run_spreading(X, given, seed), flipped)
            results.setdefault(name, {"suspects": [], "spreading": []})
            results[name]["suspects"].append(ours)
            results[name]["spreading"].append(base)
            print(f"{name:8} {seed:>4} {len(flipped):>4}  {ours:9.3f}  {base:18.3f}", flush=True)
    for name, r in results.items():
        print(f"{name:8} mean       {statistics.mean(r['suspects']):9.3f}  {statistics.mean(r['spreading']):18.3f}"
              f"   (suspects - baseline: {statistics.mean(r['suspects']) - statistics.mean(r['spreading']):+.3f})")


if __name__ == "__main__":
    main()
