"""Heads beside the store: fitting them on a version, their folder, reloading them, the predictions table."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from clipfuse.data import AtomicFolder, default_class_words, load_class_words
from clipfuse.store import EmbeddingSet, EmbeddingVersion, Store

from .results import Notice

ENSEMBLE_FILE = "ensemble.json"
FIT_IDS_FILE = "fit_ids.npy"  # ids of the rows the heads were fitted on, in order
CONFIG_FILE = "config.json"  # the resolved train-heads config


# ---- the heads folder ---------------------------------------------------------------------------
HEADS_FILES = frozenset({ENSEMBLE_FILE, "ensemble.safetensors", FIT_IDS_FILE, CONFIG_FILE})


def _is_heads_folder(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but saved heads (or part of them being written)."""
    return all(p.name in HEADS_FILES for p in folder.iterdir())


def heads_folder(store: Store, version: EmbeddingVersion):
    """``<db>/_heads/<fingerprint>``: a link to the current generation of the version's heads
    (on S3: objects in generations, read through a local cache).

    Heads are written under the store's writer lock, so any staging folder found is stale.
    """
    return store_folder(store, store.heads_name(version.fingerprint))


def store_folder(store: Store, name: str):
    """The folder ``name`` beside the store's tables: an AtomicFolder on disk, an ObjectFolder on S3."""
    if not store.is_local:
        return store.object_folder(name)
    return AtomicFolder(Path(store.uri) / name, owns=_is_heads_folder, generations=True, stale_after=0.0)


def current_heads(store: Store, version: EmbeddingVersion) -> Path | None:
    """The folder of the version's current heads (read-only: readers never rename or repair)."""
    return heads_folder(store, version).current()


def save_heads(store: Store, version: EmbeddingVersion, ensemble, es: EmbeddingSet, resolved: dict) -> Path:
    """Publish fitted heads as a new generation of the version's heads folder.

    Everything goes into a fresh folder, then one atomic symlink swap makes it current: a
    crash leaves the previous heads, and a reader that opened the previous generation reads
    it whole.
    """
    from clipfuse.classify import save_ensemble

    def fill(staging: Path) -> None:
        save_ensemble(ensemble, staging, extra={"classes": es.classes, "fingerprint": version.fingerprint,
                                                "n_fit_rows": len(es.ids)})
        np.save(staging / FIT_IDS_FILE, es.ids.astype("U"), allow_pickle=False)
        (staging / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))

    with store.writer("clipfuse train-heads"):
        return heads_folder(store, version).replace(fill)


@dataclasses.dataclass
class Trained:
    """A version's saved heads, reloaded onto the store's current rows."""

    ensemble: object  # clipfuse.classify.Ensemble
    meta: dict  # saved metadata: classes (as trained), fingerprint, n_fit_rows
    es: EmbeddingSet  # the version's rows now (over several versions: their union, with X None)
    fit_rows: np.ndarray  # row of each current row in the fitted matrix, -1 for rows added since
    folder: Path
    versions: list[EmbeddingVersion] | None = None  # the versions of a cross-version ensemble, in trained order
    views: dict | None = None  # version short -> clipfuse.classify.ViewRows of its current rows
    sets: list[EmbeddingSet] | None = None  # each version's rows now
    fit_ids: np.ndarray | None = None  # ids of the fitted rows, in order (val_idx_ and train_idx_ index them)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def new_rows(self) -> int:
        """Images indexed after the heads were trained."""
        return int(np.sum(self.fit_rows < 0))

    def predict(self, heads: list[str] | None = None, *, shift: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused and per-head probabilities of every current row (see ``Ensemble.predict_proba``)."""
        if self.views is None:
            return self.ensemble.predict_proba(self.es.X, fit_rows=self.fit_rows, heads=heads, shift=shift)
        return self.ensemble.predict_proba(self.views, heads=heads, n_rows=len(self.es.ids), shift=shift)

    def labeled_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The labeled rows' vectors and class indices (of the first version, over several)."""
        es = self.es if self.sets is None else self.sets[0]
        keep = es.labels >= 0
        return es.X[keep], es.labels[keep]


def load_trained(store: Store, version: EmbeddingVersion, *, notify: Callable[[Notice], None],
                 es: EmbeddingSet | None = None) -> Trained:
    """The saved ensemble of a version, its fitted rows mapped onto the store's current rows.

    A row removed since training keeps a zero vector (it never wins a vote); a row added
    since gets ``fit_rows == -1``.
    """
    from clipfuse.classify import load_ensemble

    folder = current_heads(store, version)
    if folder is None or not (folder / ENSEMBLE_FILE).exists():
        raise FileNotFoundError(f"no trained heads for version {version.short} in {store.uri}; "
                                "run `clipfuse train-heads` first.")
    es = es or store.load_embeddings(version.fingerprint)
    fit_ids = np.load(folder / FIT_IDS_FILE, allow_pickle=False)
    X_fit, fit_rows = remap_fitted(es, fit_ids)
    ensemble, meta = load_ensemble(folder, external={"X_fit_": X_fit})
    if meta.get("n_fit_rows") != len(fit_ids):
        raise ValueError(f"the saved heads in {folder} are incomplete (fitted rows and ids disagree); "
                         "run `clipfuse train-heads` again.")
    check_classes(meta, es.classes, notify, "clipfuse train-heads")
    return Trained(ensemble, meta, es, fit_rows, folder, fit_ids=fit_ids)


def remap_fitted(es: EmbeddingSet, fit_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fitted rows' vectors as the store holds them now, and the fitted row of each current row.

    Returns ``X_fit`` (len(fit_ids), dim): a row removed since training keeps a zero vector
    (it never wins a vote); ``es.X`` itself when nothing changed. ``fit_rows`` (len(es.ids),):
    -1 for rows added since.
    """
    if len(fit_ids) == len(es.ids) and np.array_equal(fit_ids, es.ids):
        return es.X, np.arange(len(es.ids))  # the rows are the fitted rows, in order: no copy
    position = {id_: i for i, id_ in enumerate(es.ids)}
    current = np.array([position.get(i, -1) for i in fit_ids], dtype=np.int64)
    X_fit = np.zeros((len(fit_ids), es.X.shape[1]), dtype=np.float32)
    X_fit[current >= 0] = es.X[current[current >= 0]]
    fit_position = {id_: i for i, id_ in enumerate(fit_ids)}
    return X_fit, np.array([fit_position.get(i, -1) for i in es.ids], dtype=np.int64)


def check_classes(meta: dict, classes: list[str], notify: Callable[[Notice], None], retrain: str) -> None:
    """Classes only get appended: fail if the trained ones changed, say so if some were added."""
    if meta["classes"] != classes[:len(meta["classes"])]:
        raise ValueError(f"the store's classes changed since train-heads ({len(meta['classes'])} then, "
                         f"{len(classes)} now); run `{retrain}` again.")
    if len(classes) > len(meta["classes"]):
        notify(Notice(f"{len(classes) - len(meta['classes'])} class(es) were added since train-heads; images "
                      f"are predicted among the old classes until you run `{retrain}` again."))


# ---- what the heads are fitted with ---------------------------------------------------------------
def class_words(path, classes: list[str], *, notify: Callable[[Notice], None]) -> dict[str, list[str]]:
    """Class words from a YAML/JSON file (naming the classes it leaves out) or the folder names."""
    if path is None:
        return default_class_words(classes)
    words, defaulted = load_class_words(path, classes)
    if defaulted:
        notify(Notice(f"{len(defaulted)} class(es) not in {path} use their folder name: "
                      f"{', '.join(defaulted[:10])}{' ...' if len(defaulted) > 10 else ''}"))
    return words


def require_labels(store: Store, version: EmbeddingVersion, es: EmbeddingSet) -> None:
    """Fail, saying what is missing, unless the labels can train a classifier: two classes or more.
    With a single label per class nothing is held out: the ensemble then picks its graph method by
    a transductive rule and ``evaluate`` says that no held-out score exists."""
    n_labeled = int(np.sum(es.labels >= 0))
    if n_labeled == 0:
        others = [v for v in store.versions() if v.fingerprint != version.fingerprint and v.rows]
        hint = ("; other versions: " + ", ".join(v.describe() for v in others) + ". Pick one with --version"
                if others else "; index a folder with one sub-folder per class")
        raise ValueError(f"version {version.short} ({version.model}, {len(es.ids)} images) of store "
                         f"{store.uri!r} has no labeled images{hint}.")
    labeled_classes = sorted({es.classes[i] for i in es.labels[es.labels >= 0]})
    if len(labeled_classes) < 2:
        raise ValueError(f"only one class ({labeled_classes[0]!r}) has labeled images in version "
                         f"{version.short}: telling classes apart needs labeled images of at least two. "
                         "Add another class folder (LABELED_DIR/<class>/<image>) and index it, "
                         "or label images of another class with `clipfuse label ID_OR_PATH CLASS`.")


def finetuned_head(version: EmbeddingVersion, classes: list[str], model: str | None = None):
    """The classifier saved with the version's model by finetune/wise-ft: ((weight, bias or None), None),
    or (None, reason). ``model``: the name that loads the version's model here (its folder, or the store's
    copy of it; default: the version's own)."""
    from clipfuse.embed import parse_model_name

    folder = parse_model_name(model or version.model).folder
    not_ours = f"version {version.short} was not made by a model finetuned with clipfuse"
    if folder is None:
        return None, not_ours
    from clipfuse.train import read_model_folder

    try:
        meta, heads = read_model_folder(folder)
    except FileNotFoundError:
        return None, not_ours
    if "finetuned" not in heads or meta.get("classes") != classes:
        return None, "the finetuned model's classes differ from the store's; finetune again"
    bias = heads["finetuned"].get("bias")
    return (heads["finetuned"]["weight"].numpy(), None if bias is None else bias.numpy()), None


# ---- the predictions table ---------------------------------------------------------------------------
def ood_column(trained: Trained, fused: np.ndarray) -> np.ndarray:
    """The OOD score of every current row (see :func:`clipfuse.classify.ood_scores`), float32.

    Over several versions the first version's vectors score the rows it holds; rows only
    later versions hold are NaN (no score).
    """
    from clipfuse.classify import ood_scores

    n_classes = fused.shape[1]
    labels = np.where(trained.es.labels < n_classes, trained.es.labels, -1)  # classes added since: unknown to P
    if trained.views is None:
        return ood_scores(trained.es.X, fused, labels) if len(fused) else np.zeros(0, np.float32)
    first = trained.views[trained.versions[0].short]
    out = np.full(len(fused), np.nan, dtype=np.float32)
    if len(first.rows):
        out[first.rows] = ood_scores(first.X, fused[first.rows], labels[first.rows])
    return out


def predictions_table(es: EmbeddingSet, fused: np.ndarray, per_head: dict[str, np.ndarray], classes: list[str],
                      ood: np.ndarray | None = None):
    """Rows of a version's predictions table.

    Columns: ``id, split, label, label_index, confidence, ood`` (with ``ood``: the OOD score,
    float32, null where NaN), ``known_label, probs`` (fused, one value per trained class),
    and ``probs_<head>`` for each head in ``per_head`` (pass {} to leave them out).
    ``classes`` are the trained classes, the columns of the probabilities. Tables written
    before the ``ood`` column existed lack it; readers treat that as no score.
    """
    import pyarrow as pa

    n_classes = len(classes)

    def probs(P):
        P = np.asarray(P, dtype=np.float32)
        missing = np.isnan(P).any(axis=1)  # rows a head's version lacks: null, not NaN (LanceDB refuses NaN vectors)
        mask = pa.array(missing) if missing.any() else None
        return pa.FixedSizeListArray.from_arrays(pa.array(np.nan_to_num(P, nan=0.0).reshape(-1)), n_classes,
                                                 mask=mask)

    pred = fused.argmax(axis=1)
    known = [es.classes[i] if i >= 0 else None for i in es.labels]
    columns = {
        "id": pa.array(es.ids, pa.string()),
        "split": pa.array(es.splits, pa.string()),
        "label": pa.array([classes[i] for i in pred], pa.string()),
        "label_index": pa.array(pred.astype(np.int32)),
        "confidence": pa.array(fused.max(axis=1).astype(np.float32)),
        # NaN -> null: no score (a row only later versions hold)
        **({} if ood is None else {"ood": pa.array(np.asarray(ood, dtype=np.float32), from_pandas=True)}),
        "known_label": pa.array(known, pa.string()),
        "probs": probs(fused),
    }
    for head, P in per_head.items():  # 'probe' -> probs_probe, '3f2a9c0d1e5b/zero-shot:a' -> probs_3f2a9c0d1e5b_zero_shot_a
        columns["probs_" + re.sub(r"[^0-9A-Za-z_]", "_", head)] = probs(P)
    return pa.table(columns)


def resolved_config(config, version: EmbeddingVersion, es: EmbeddingSet, *, text: bool) -> dict:
    """What config.json beside the heads records."""
    return {**dataclasses.asdict(config), "fingerprint": version.fingerprint, "model": version.model,
            "pretrained": version.pretrained, "rows": len(es.ids), "labeled": int(np.sum(es.labels >= 0)),
            "classes": es.classes, "trained_at": time.time(), "text_embeddings": text}
