"""Benchmark: simulated labeling rounds with ``suggest`` against random picks of the same budget.

Start at 3 labels per class; each round, ``suggest -n B`` picks B images, which the truth labels
(``ws.label``), and the stack is trained again; the random arm labels B random unlabeled images
instead. Accuracy is the fused prediction's on every image without a label, after each round.
For reference, the simple rule the issue names runs too: sklearn's LabelSpreading with picks by
margin × k-means diversity, against LabelSpreading with random picks; and an arm that knows the
truth and labels only images the stack gets wrong now.

Datasets: digits (scikit-learn's 1,797 as raw pixels) and a 48-class mixture (as
bench/classify_scale.py). Writes the mean curves to ``--plot``.

    python bench/active_learning.py --seeds 0 1 2 3 4
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--digits-batch", type=int, default=20)
    p.add_argument("--mixture-batch", type=int, default=48)
    p.add_argument("--mixture-n", type=int, default=5000)
    p.add_argument("--skip-mixture", action="store_true")
    p.add_argument("--heads", default="probe,knn,propagation,kmeans,pseudo", help="heads on digits")
    p.add_argument("--mixture-heads", default="probe,knn,propagation,kmeans,pseudo")
    p.add_argument("--mixture-seeds", type=int, nargs="+", default=None, help="seeds of the 48-class runs (default: --seeds)")
    p.add_argument("--plot", default=str(Path(__file__).with_name("results") / "active_learning.png"))
    return p.parse_args(argv)


def load(name: str, args, seed: int):
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X = d.data.astype(np.float32)
        return X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12), d.target.astype(np.int64)
    X, y, _ = classify_scale.make_clustered(args.mixture_n, 512, 48, 4, 2.4, seed)
    return X, y


def start_labels(y, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    given = np.full_like(y, -1)
    for c in np.unique(y):
        given[rng.choice(np.flatnonzero(y == c), per_class, replace=False)] = c
    return given


def stack_run(X, y, given, rounds: int, batch: int, heads: str, seed: int, pick: str) -> list[float]:
    """Accuracy on the unlabeled rows after 0..rounds rounds, through the store and the whole stack."""
    import polars as pl

    import clipfuse
    from clipfuse.workspace import load_trained

    given = given.copy()
    rng = np.random.default_rng(seed + 1000)
    with tempfile.TemporaryDirectory(prefix="clipfuse-al-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "v.npy", X)
        ids = [f"r{i:06d}" for i in range(len(X))]
        pl.DataFrame({"id": ids, "label": [None if c < 0 else f"c{c:02d}" for c in given]}).write_parquet(tmp / "m.parquet")
        ws = clipfuse.open(tmp / "s.lance")
        ws.import_embeddings(tmp / "v.npy", metadata=tmp / "m.parquet")
        curve = []
        for r in range(rounds + 1):
            ws.train_heads(heads=heads, folds=2)
            trained = load_trained(ws.store, ws.version(), notify=lambda n: None)
            fused, _ = trained.predict()
            row = {id_: i for i, id_ in enumerate(trained.es.ids)}
            order = np.array([row[i] for i in ids])
            pred = fused[order].argmax(1)
            classes = [int(c[1:]) for c in trained.classes]
            unl = given < 0
            curve.append(float(np.mean(np.array(classes)[pred[unl]] == y[unl])))
            if r == rounds:
                break
            if pick == "suggest":
                chosen = [int(s.id[1:]) for s in ws.suggest(n=batch, seed=seed).suggestions]
            elif pick == "oracle":  # knows the truth: labels images the stack gets wrong now
                wrong = np.flatnonzero(unl & (np.array(classes)[pred] != y))
                chosen = rng.choice(wrong, min(batch, len(wrong)), replace=False).tolist()
                if len(chosen) < batch:
                    rest = np.setdiff1d(np.flatnonzero(unl), chosen)
                    chosen += rng.choice(rest, batch - len(chosen), replace=False).tolist()
            else:
                chosen = rng.choice(np.flatnonzero(given < 0), batch, replace=False).tolist()
            for i in chosen:
                given[i] = y[i]
            csv = tmp / f"round{r}.csv"
            pl.DataFrame({"id": [ids[i] for i in chosen], "label": [f"c{y[i]:02d}" for i in chosen]}).write_csv(csv)
            ws.label(from_csv=csv)
    return curve


def spreading_run(X, y, given, rounds: int, batch: int, seed: int, pick: str) -> list[float]:
    """The simple rule: LabelSpreading, picks by margin x k-means diversity (or random)."""
    from sklearn.cluster import KMeans
    from sklearn.semi_supervised import LabelSpreading

    given = given.copy()
    rng = np.random.default_rng(seed + 1000)
    curve = []
    for r in range(rounds + 1):
        model = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.2, max_iter=100).fit(X, given)
        unl = given < 0
        curve.append(float(np.mean(model.transduction_[unl] == y[unl])))
        if r == rounds:
            break
        pool = np.flatnonzero(unl)
        if pick == "rule":
            P = np.sort(model.label_distributions_[pool], axis=1)
            margin = P[:, -1] - P[:, -2]
            top = pool[np.argsort(margin)[: 10 * batch]]
            groups = KMeans(n_clusters=batch, random_state=seed, n_init=3).fit_predict(X[top])
            chosen = [top[np.flatnonzero(groups == g)[0]] for g in range(batch)]
        else:
            chosen = rng.choice(pool, batch, replace=False)
        given[np.asarray(chosen)] = y[np.asarray(chosen)]
    return curve


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    curves: dict[str, dict[str, list[list[float]]]] = {}
    names = ["digits"] + ([] if args.skip_mixture else ["mixture"])
    for name in names:
        batch = args.digits_batch if name == "digits" else args.mixture_batch
        heads = args.heads if name == "digits" else args.mixture_heads
        for seed in args.seeds if name == "digits" else (args.mixture_seeds or args.seeds):
            X, y = load(name, args, seed)
            given = start_labels(y, 3, seed)
            runs = {"suggest": stack_run(X, y, given, args.rounds, batch, heads, seed, "suggest"),
                    "random": stack_run(X, y, given, args.rounds, batch, heads, seed, "random"),
                    "the stack's errors (knows the truth)": stack_run(X, y, given, args.rounds, batch, heads, seed,
                                                                    "oracle"),
                    "rule (LabelSpreading)": spreading_run(X, y, given, args.rounds, batch, seed, "rule"),
                    "random (LabelSpreading)": spreading_run(X, y, given, args.rounds, batch, seed, "random")}
            for arm, c in runs.items():
                curves.setdefault(name, {}).setdefault(arm, []).append(c)
            print(f"{name} seed {seed}: " + "; ".join(f"{arm} " + " ".join(f"{v:.3f}" for v in c)
                                                    for arm, c in runs.items()), flush=True)
    print()
    for name, arms in curves.items():
        mean = {arm: np.mean(np.array(c), axis=0) for arm, c in arms.items()}
        for arm, m in mean.items():
            print(f"{name:8} {arm:24} " + " ".join(f"{v:.3f}" for v in m))
        gains = [s[-1] - r[-1] for s, r in zip(arms["suggest"], arms["random"])]
        rule = [s[-1] - r[-1] for s, r in zip(arms["rule (LabelSpreading)"], arms["random (LabelSpreading)"])]
        print(f"{name:8} gain after {args.rounds} rounds: suggest - random {statistics.mean(gains):+.3f} "
              f"(seeds {', '.join(f'{g:+.3f}' for g in gains)}); rule - random {statistics.mean(rule):+.3f} "
              f"(seeds {', '.join(f'{g:+.3f}' for g in rule)})")
        # The gain is bounded by what random picks leave to gain (1 - accuracy): the share of the
        # random arm's remaining errors that the picks removed compares arms of different accuracy.
        oracle = [s[-1] - r[-1] for s, r in zip(arms["the stack's errors (knows the truth)"], arms["random"])]
        print(f"{name:8} gain of labeling the stack's own errors (knowing the truth): {statistics.mean(oracle):+.3f} "
              "(hard cases alone teach less than suggest's mix)")
        print(f"{name:8} errors left by random picks that the picks removed: suggest "
              f"{_removed(mean['suggest'], mean['random']):.0%}, rule "
              f"{_removed(mean['rule (LabelSpreading)'], mean['random (LabelSpreading)']):.0%}")
    plot(curves, args)


def _removed(picked, random) -> float:
    return float((picked[-1] - random[-1]) / max(1e-12, 1.0 - random[-1]))


def plot(curves, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), squeeze=False)
    for ax, (name, arms) in zip(axes[0], curves.items()):
        batch = args.digits_batch if name == "digits" else args.mixture_batch
        for arm, c in arms.items():
            m = np.mean(np.array(c), axis=0)
            ax.plot([3 * (10 if name == "digits" else 48) + batch * r for r in range(len(m))], m, marker="o",
                    label=arm, linestyle="--" if "LabelSpreading" in arm else (":" if "knows the truth" in arm else "-"))
        ax.set_title(f"{name}: accuracy on unlabeled images ({len(next(iter(arms.values())))} seeds)", fontsize=10)
        ax.set_xlabel("labels")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
