"""Benchmark: the ensemble's passes over X, committed code (git HEAD) against the working tree.

Loads ``classify/`` as committed at ``--rev`` into a temporary package beside the working
tree's ``clipfuse.classify``, fits the same fixed-seed ensemble with each (the default
heads, as `clipfuse train-heads`; finetuned is unavailable without a finetuned model) on
the synthetic clustered vectors of ``classify_scale.py``, and prints side by side:

* passes over the whole of X during ``fit`` and ``predict_proba``: BLAKE2b hashes,
  ``check_array`` calls and L2 norms over every row;
* wall and process CPU time of ``fit`` (and per head), of ``predict_proba(X,
  fit_rows=arange(n))`` (the CLI's call) and of ``predict_proba(X)`` with every head but
  propagation (each predicts every row);
* the largest difference between the two versions' probabilities (they must agree).

    python bench/classify_once.py                          # 100,000 x 512, ~3 min on 2 cores
    python bench/classify_once.py --n 5000 --dim 64 --float64 --scaled   # conversion paths
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sklearn.utils.validation as skv

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify_scale import hide_labels, make_clustered


def load_committed_classify(rev: str, folder: Path, repo: Path = REPO):
    """``classify/`` at ``rev`` as the package ``clipfuse_classify_<rev>`` (own registry and caches)."""
    name = "clipfuse_classify_" + "".join(c if c.isalnum() else "_" for c in rev)
    pkg = folder / name
    pkg.mkdir()
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "--name-only", rev, "classify/"],
                           check=True, capture_output=True, text=True).stdout.split()
    for path in files:
        if path.endswith(".py"):
            text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"],
                                  check=True, capture_output=True, text=True).stdout
            (pkg / Path(path).name).write_text(text.replace("clipfuse.classify", name))
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


class Passes:
    """Counts, while active, the work done on arrays of ``n`` rows (and every BLAKE2b hash)."""

    def __init__(self, n: int, modules):
        self.n, self.modules = n, modules
        self.counts = {"hash": 0, "check_array": 0, "norm": 0}

    def __enter__(self):
        self.real = hashlib.blake2b, skv.check_array, np.linalg.norm
        real_hash, real_check, real_norm = self.real
        whole = lambda A: np.ndim(A) == 2 and len(A) == self.n

        def blake2b(*a, **k):
            self.counts["hash"] += 1
            return real_hash(*a, **k)

        def check_array(A, *a, **k):
            self.counts["check_array"] += whole(A)
            return real_check(A, *a, **k)

        def norm(A, *a, **k):
            self.counts["norm"] += whole(A)
            return real_norm(A, *a, **k)

        hashlib.blake2b, skv.check_array, np.linalg.norm = blake2b, check_array, norm
        self.patched = [m for m in self.modules if hasattr(m, "check_array")]
        for m in self.patched:  # modules that imported check_array by name
            m.check_array = check_array
        return self.counts

    def __exit__(self, *exc):
        hashlib.blake2b, skv.check_array, np.linalg.norm = self.real
        for m in self.patched:
            m.check_array = self.real[1]


def _timed(out: dict, key: str):
    """Context manager: wall and process CPU seconds of the block into ``out[key + "_s" / "_cpu"]``."""
    from contextlib import contextmanager

    @contextmanager
    def block():
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        out[key + "_s"] = time.perf_counter() - wall
        out[key + "_cpu"] = time.process_time() - cpu

    return block()


def run(label: str, classify, X, y_semi, text, n_classes: int) -> dict:
    base = importlib.import_module(classify.__name__ + ".base")
    ens = classify.create_ensemble_from_config(classify.HeadsConfig(), n_classes, text)
    out = {}
    with Passes(len(X), [base]) as counts, _timed(out, "fit"):
        ens.fit(X, y_semi)
    out["fit_passes"] = dict(counts)
    out["head_s"] = dict(ens.fit_seconds_)
    with Passes(len(X), [base]) as counts, _timed(out, "predict_rows"):
        out["fused_rows"], out["heads_rows"] = ens.predict_proba(X, fit_rows=np.arange(len(X)))
    out["predict_rows_passes"] = dict(counts)
    # new rows: every head but propagation predicts all of X (propagation's n x n_fit product
    # costs minutes at this size and touches X once either way)
    inductive = [h for h in ens.head_names_ if h != "propagation"]
    with Passes(len(X), [base]) as counts, _timed(out, "predict_new"):
        out["fused_new"], out["heads_new"] = ens.predict_proba(X, heads=inductive)
    out["predict_new_passes"] = dict(counts)
    out["weights"] = ens.weights_
    out["unavailable"] = sorted(ens.unavailable_)
    print(f"{label}: fit {out['fit_s']:.1f} s, predict(fit_rows) {out['predict_rows_s']:.1f} s, "
          f"predict(new, {len(inductive)} heads) {out['predict_new_s']:.1f} s", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=48)
    p.add_argument("--labels", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rev", default="HEAD", help="git revision of the 'before' classify/")
    p.add_argument("--repo", type=Path, default=REPO, help="git repository to read --rev from")
    p.add_argument("--after-first", action="store_true", help="run the working tree first")
    p.add_argument("--float64", action="store_true", help="hand the ensemble float64 rows")
    p.add_argument("--scaled", action="store_true", help="rows not unit length (normalising copies)")
    args = p.parse_args(argv)

    X, y, centres = make_clustered(args.n, args.dim, args.classes, 4, 2.4, args.seed)
    if args.scaled:
        X *= np.random.default_rng(args.seed + 2).uniform(0.5, 2.0, (len(X), 1)).astype(np.float32)
    if args.float64:
        X = X.astype(np.float64)
    y_semi = hide_labels(y, args.labels, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    text = centres + 1.2 * rng.standard_normal(centres.shape).astype(np.float32) / np.sqrt(args.dim)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    print(f"data: {args.n:,} x {args.dim} {X.dtype}{' (scaled rows)' if args.scaled else ''}, "
          f"{args.classes} classes, {args.labels} labels each", flush=True)

    import clipfuse.classify as new

    with tempfile.TemporaryDirectory() as tmp:
        old = load_committed_classify(args.rev, Path(tmp), args.repo)
        if args.after_first:
            after = run("after (working tree)", new, X, y_semi, text, args.classes)
        before = run(f"before ({args.rev})", old, X, y_semi, text, args.classes)
        if not args.after_first:
            after = run("after (working tree)", new, X, y_semi, text, args.classes)

    print(f"\n{'':<30}{'before':>10}{'after':>10}{'ratio':>8}")
    for stage in ("fit", "predict_rows", "predict_new"):
        for kind in ("s", "cpu"):
            key = f"{stage}_{kind}"
            print(f"{key:<30}{before[key]:>10.2f}{after[key]:>10.2f}{before[key] / after[key]:>7.2f}x")
    for h, t in before["head_s"].items():
        print(f"{'fit_s ' + h:<30}{t:>10.2f}{after['head_s'][h]:>10.2f}{t / after['head_s'][h]:>7.2f}x")
    for stage in ("fit_passes", "predict_rows_passes", "predict_new_passes"):
        for kind in ("hash", "check_array", "norm"):
            print(f"{stage + ' ' + kind:<30}{before[stage][kind]:>10}{after[stage][kind]:>10}")
    assert before["unavailable"] == after["unavailable"]
    diffs = {"weights": max(abs(before["weights"][h] - after["weights"][h]) for h in before["weights"])}
    for which in ("rows", "new"):
        diffs[f"fused ({which})"] = float(np.max(np.abs(before[f"fused_{which}"] - after[f"fused_{which}"])))
        for h, P in before[f"heads_{which}"].items():
            diffs[f"{h} ({which})"] = float(np.max(np.abs(P - after[f"heads_{which}"][h])))
    worst = max(diffs.values())
    print("\nlargest |before - after|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(f"identical within 1e-6: {'YES' if worst <= 1e-6 else 'NO'} (max {worst:.2e})")


if __name__ == "__main__":
    main()
