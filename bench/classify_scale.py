"""Benchmark: the whole classifier stack on 300,000 x 512 synthetic clustered vectors.

Data: 48 classes, each a mixture of ``--modes`` sub-clusters around a random unit class
centre, L2-normalised (the shape CLIP embeddings of a fine-grained dataset have); 15
labels per class, the rest unlabeled. Zero-shot gets synthetic "text" embeddings: the
class centres plus noise, so it is informative but imperfect, as real prompts are.

Part 1 goes through the Python API, as a user would: the vectors are imported into a
store (``ws.import_embeddings``, not timed), then ``ws.train_heads()`` loads the version
from LanceDB, fits every head (per head: ``n_folds`` out-of-fold fits, one on the train
split and one refit on all labels) and the fusion and saves them beside the store, and
``ws.predict()`` reloads them and writes the predictions table. It prints, per head, fit
time, peak RSS while it ran and validation accuracy; then the load, save, predict and
whole-stack figures. Targets: whole stack <= 120 s and <= 4 GB peak RSS on 2 cores.

Part 2 compares one fit of LabelPropagationHead with scikit-learn's
LabelSpreading(kernel="knn") on the first ``--spreading-n`` rows, measured side by side.
Target: >= 10x faster at equal or better accuracy.

    python bench/classify_scale.py                 # ~5 min on 2 cores
    python bench/classify_scale.py --n 50000 --skip-spreading
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import clipfuse
from clipfuse.classify import HeadsConfig, LabelPropagationHead

TARGET_SECONDS, TARGET_GB, TARGET_SPEEDUP = 120.0, 4.0, 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300_000, help="rows of the stack benchmark")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=48)
    p.add_argument("--labels", type=int, default=15, help="labeled rows per class")
    p.add_argument("--modes", type=int, default=4, help="sub-clusters per class")
    p.add_argument("--noise", type=float, default=2.4,
                   help="noise norm relative to the sub-cluster centre (higher = harder)")
    p.add_argument("--spreading-n", type=int, default=50_000, help="rows of the LabelSpreading comparison")
    p.add_argument("--skip-spreading", action="store_true")
    p.add_argument("--skip-stack", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class PeakRSS:
    """Samples this process's resident set size every 20 ms; ``peak()`` since the last ``reset()``."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.02)

    def reset(self) -> None:
        self._peak = self._rss()

    def peak(self) -> int:
        return max(self._peak, self._rss())

    def stop(self) -> None:
        self._stop.set()


def make_clustered(n: int, dim: int, n_classes: int, modes: int, noise: float, seed: int, spread: float = 0.8):
    """Unit vectors around ``modes`` sub-centres per class; returns X, y and the class centres."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)  # classes share a direction,
    centres = shared + spread * rng.standard_normal((n_classes, dim)).astype(np.float32) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)  # as CLIP's classes do (cos ~0.5-0.8)
    subs = centres[:, None, :] + 0.8 * rng.standard_normal((n_classes, modes, dim)).astype(np.float32) / np.sqrt(dim)
    subs /= np.linalg.norm(subs, axis=2, keepdims=True)
    y = rng.integers(0, n_classes, n)
    mode = rng.integers(0, modes, n)
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # bounded temporaries
        stop = min(start + 50_000, n)
        block = subs[y[start:stop], mode[start:stop]]
        block += (noise / np.sqrt(dim)) * rng.standard_normal((stop - start, dim), dtype=np.float32)
        X[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return X, y, centres


def hide_labels(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.full_like(y, -1)
    for c in np.unique(y):
        out[rng.choice(np.flatnonzero(y == c), per_class, replace=False)] = c
    return out


def _import(ws, X: np.ndarray, y_semi: np.ndarray, folder: Path) -> None:
    """Write the vectors into the workspace's store as an imported version (labels as class names)."""
    import polars as pl

    np.save(folder / "vectors.npy", X)
    labels = [None if c < 0 else f"class_{c:02d}" for c in y_semi]
    pl.DataFrame({"id": [f"row{i:07d}" for i in range(len(X))], "label": labels}).write_parquet(folder / "rows.parquet")
    ws.import_embeddings(folder / "vectors.npy", metadata=folder / "rows.parquet")


def run_stack(args, rss: PeakRSS) -> dict:
    X, y, centres = make_clustered(args.n, args.dim, args.classes, args.modes, args.noise, args.seed)
    y_semi = hide_labels(y, args.labels, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    text = centres + 1.2 * rng.standard_normal(centres.shape).astype(np.float32) / np.sqrt(args.dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    print(f"data: {args.n:,} x {args.dim}, {args.classes} classes, {args.labels} labels each; "
          f"mean cos to class centre {np.mean(np.sum(X[:5000] * centres[y[:5000]], axis=1)):.3f}")
    folder = Path(tempfile.mkdtemp(prefix="clipfuse-bench-"))
    ws = clipfuse.open(folder / "store.lance")
    t = time.perf_counter()
    _import(ws, X, y_semi, folder)
    print(f"imported into {folder / 'store.lance'} in {time.perf_counter() - t:.1f} s (not part of the stack)")
    truth = dict(zip((f"row{i:07d}" for i in range(len(X))), y))
    del X  # the stack reads the vectors back from the store, as train-heads does

    peaks: dict[str, int] = {}
    current = {"head": None}

    def progress(stage, done, total):
        head = stage.split(":")[0]
        if head != current["head"]:
            if current["head"] is not None:
                peaks[current["head"]] = rss.peak()
            current["head"] = head
            rss.reset()

    config = HeadsConfig()
    rss.reset()
    start_peak = rss.peak()
    t0 = time.perf_counter()
    trained = ws.train_heads(text_embeddings=text, progress=progress)
    train_seconds = time.perf_counter() - t0
    peaks[current["head"]] = rss.peak()
    rss.reset()
    t1 = time.perf_counter()
    predicted = ws.predict()
    predict_seconds = time.perf_counter() - t1
    peaks["predict"] = rss.peak()
    total = time.perf_counter() - t0
    fit_total = sum(trained.fit_seconds.values())

    table = ws.store.predictions().select(["id", "split", "label_index"]).to_pydict()
    unl = [i for i, s in enumerate(table["split"]) if s == "unlabeled"]
    fused_acc = float(np.mean([table["label_index"][i] == truth[table["id"][i]] for i in unl]))
    fits = config.n_folds + 1 + int(config.refit)
    print(f"\nwhole stack through the API ({fits} fits per head: {config.n_folds} out-of-fold, train split, refit)")
    print(f"{'stage':<14}{'seconds':>9}{'peak RSS GB':>13}{'val acc':>10}{'weight':>8}")
    for h in trained.heads:
        print(f"{h:<14}{trained.fit_seconds[h]:>9.1f}{peaks.get(h, 0) / 1e9:>13.2f}{trained.scores[h]['accuracy']:>10.3f}"
              f"{trained.weights[h]:>8.2f}")
    for h, why in trained.unavailable.items():
        print(f"{h:<14} unavailable: {why}")
    print(f"{'fusion':<14}{trained.fit_seconds.get('fusion', 0.0):>9.1f}{'':>13}{trained.fused_accuracy:>10.3f}")
    print(f"{'load + save':<14}{train_seconds - fit_total:>9.1f}   (read the version from LanceDB, save the heads)")
    print(f"{'predict':<14}{predict_seconds:>9.1f}{peaks['predict'] / 1e9:>13.2f}   "
          f"(reload heads, {predicted.images:,} rows, write the predictions table)")
    peak = max(peaks.values())
    print(f"{'TOTAL':<14}{total:>9.1f}{peak / 1e9:>13.2f}   (RSS before: {start_peak / 1e9:.2f} GB)")
    ok_t, ok_m = total <= TARGET_SECONDS, peak / 1e9 <= TARGET_GB
    print(f"target whole stack <= {TARGET_SECONDS:.0f} s: {'PASS' if ok_t else 'MISS'} ({total:.1f} s); "
          f"<= {TARGET_GB:.0f} GB: {'PASS' if ok_m else 'MISS'} ({peak / 1e9:.2f} GB)")
    print(f"fused accuracy on the {len(unl):,} unlabeled rows: {fused_acc:.3f}")
    shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": total, "peak_gb": peak / 1e9, "fused_accuracy": fused_acc}


def run_spreading(args) -> dict:
    from sklearn.semi_supervised import LabelSpreading

    n = args.spreading_n
    X, y, _ = make_clustered(n, args.dim, args.classes, args.modes, args.noise, args.seed + 7)
    y_semi = hide_labels(y, args.labels, args.seed)
    unlabeled = y_semi == -1
    print(f"\nlabel propagation vs sklearn LabelSpreading(kernel='knn') at {n:,} rows")
    t = time.perf_counter()
    ours = LabelPropagationHead().fit(X, y_semi)
    ours_s = time.perf_counter() - t
    ours_acc = float(np.mean(ours.transduction_[unlabeled] == y[unlabeled]))
    t = time.perf_counter()
    theirs = LabelSpreading(kernel="knn", n_jobs=-1).fit(X, y_semi)
    theirs_s = time.perf_counter() - t
    theirs_acc = float(np.mean(theirs.transduction_[unlabeled] == y[unlabeled]))
    print(f"{'method':<36}{'seconds':>9}{'unlabeled acc':>15}")
    print(f"{'clipfuse LabelPropagationHead':<36}{ours_s:>9.1f}{ours_acc:>15.3f}")
    print(f"{'sklearn LabelSpreading(knn)':<36}{theirs_s:>9.1f}{theirs_acc:>15.3f}")
    speedup = theirs_s / ours_s
    ok = speedup >= TARGET_SPEEDUP and ours_acc >= theirs_acc
    print(f"target >= {TARGET_SPEEDUP:.0f}x faster at equal or better accuracy: {'PASS' if ok else 'MISS'} "
          f"({speedup:.1f}x, accuracy {ours_acc - theirs_acc:+.3f})")
    return {"speedup": speedup, "ours": ours_acc, "theirs": theirs_acc}


def main(argv=None) -> None:
    args = parse_args(argv)
    rss = PeakRSS()
    if not args.skip_stack:
        run_stack(args, rss)
    if not args.skip_spreading:
        run_spreading(args)
    rss.stop()


if __name__ == "__main__":
    main()
