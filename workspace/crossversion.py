"""Ensembles over several embedding versions: the images matched by id, one fusion over every (version, head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from clipfuse.store import EmbeddingSet, EmbeddingVersion, Store

from .heads import (CONFIG_FILE, ENSEMBLE_FILE, FIT_IDS_FILE, Trained, check_classes,
                    remap_fitted, store_folder)
from .results import Notice, OptionError


def parse_versions(versions) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` as a list of names (None stays None)."""
    if versions is None:
        return None
    items = versions.split(",") if isinstance(versions, str) else list(versions)
    return [str(v).strip() for v in items if str(v).strip()]


def ensemble_folder(store: Store, versions: list[EmbeddingVersion]):
    """``<db>/_heads/ensemble-<key>``: the current generation of the ensemble over ``versions``
    (the key depends on the set of fingerprints, not their order)."""
    return store_folder(store, store.heads_name(versions=[v.fingerprint for v in versions]))


def merge_rows(sets: list[EmbeddingSet]) -> tuple[EmbeddingSet, list[np.ndarray]]:
    """The images of several versions matched by id: their union, and each version's rows in it.

    The union keeps the first version's order, then the ids only later versions hold. Labels,
    splits and test labels come from the store's images table, so every version agrees on them.
    ``X`` of the union is None: each version keeps its own vectors.
    """
    first = sets[0]
    ids = list(first.ids)
    position = {id_: i for i, id_ in enumerate(ids)}
    take = [(0, np.arange(len(first.ids)))]
    for k, es in enumerate(sets[1:], start=1):
        new = [j for j, id_ in enumerate(es.ids) if id_ not in position]
        for j in new:
            position[es.ids[j]] = len(ids)
            ids.append(es.ids[j])
        take.append((k, np.asarray(new, dtype=np.int64)))
    n = len(ids)
    labels = np.empty(n, dtype=np.int64)
    test_labels = np.empty(n, dtype=np.int64)
    splits = np.empty(n, dtype=object)
    start = 0
    for k, rows in take:
        stop = start + len(rows)
        labels[start:stop] = sets[k].labels[rows]
        test_labels[start:stop] = sets[k].test_labels[rows]
        splits[start:stop] = sets[k].splits[rows]
        start = stop
    view_rows = [np.fromiter((position[i] for i in es.ids), dtype=np.int64, count=len(es.ids)) for es in sets]
    conflicts = sorted({c for es in sets for c in es.conflicts})
    union = EmbeddingSet(ids=np.asarray(ids, dtype=str), X=None, labels=labels, splits=splits.astype(str),
                         test_labels=test_labels, classes=first.classes, fingerprint="+".join(es.fingerprint for es in sets),
                         conflicts=conflicts)
    return union, view_rows


def fill_hint(version: EmbeddingVersion) -> str:
    """How a user gives a version the vectors of images indexed after it was made."""
    if version.imported:
        return ("imported vectors can't be added to (an import is fingerprinted by its vectors): import vectors "
                "for every image, which makes a new version, and use that one")
    folder = version.model_name.folder
    if folder is not None and version.model.startswith("local-dir:"):
        return f"`clipfuse reembed --model-checkpoint {folder}` would fill it"
    pretrained = f" --pretrained {version.pretrained}" if version.pretrained else ""
    return f"`clipfuse index <your folders> --model {version.model}{pretrained}` would embed only the missing ones"


def report_missing(versions: list[EmbeddingVersion], sets: list[EmbeddingSet], n_rows: int,
                   notify: Callable[[Notice], None]) -> dict[str, int]:
    """A notice per version that lacks some of the images the others hold; returns the counts."""
    missing = {}
    for v, es in zip(versions, sets):
        lacks = n_rows - len(es.ids)
        if lacks:
            missing[v.short] = lacks
            notify(Notice(f"version {v.short} ({v.model}) lacks {lacks} of the {n_rows} images (indexed after it was "
                          f"made); they are predicted from the other versions. {fill_hint(v)[0].upper()}"
                          f"{fill_hint(v)[1:]}."))
    return missing


def require_view_labels(versions: list[EmbeddingVersion], sets: list[EmbeddingSet], union: EmbeddingSet) -> None:
    """Each version must hold labeled images of every labeled class.

    A version without the labels of a class has heads that don't know the class exists:
    they put its images confidently in other classes and outvote the versions that know it
    (measured: 0.65 -> 0.32 accuracy on such a class), so it is refused, naming the class.
    """
    labeled = set(np.unique(union.labels[union.labels >= 0]).tolist())
    for v, es in zip(versions, sets):
        held = set(np.unique(es.labels[es.labels >= 0]).tolist())
        lacking = sorted(labeled - held)
        if len(held) < 2:
            raise ValueError(f"version {v.short} ({v.model}) holds labeled images of {len(held)} class(es), so none "
                             f"of its heads can be trained; {fill_hint(v)}, or leave it out of --versions.")
        if lacking:
            names = ", ".join(repr(union.classes[c]) for c in lacking[:5]) + (" ..." if len(lacking) > 5 else "")
            raise ValueError(f"version {v.short} ({v.model}) holds no labeled image of {len(lacking)} class(es) "
                             f"({names}), so its heads would put those images in other classes and outvote the "
                             f"versions that know them; {fill_hint(v)}, or leave it out of --versions.")


def version_record(v: EmbeddingVersion, rows: int) -> dict:
    return {"fingerprint": v.fingerprint, "short": v.short, "model": v.model, "created_at": v.created_at, "rows": rows}


def save_cross_heads(store: Store, versions: list[EmbeddingVersion], ensemble, union: EmbeddingSet,
                     sets: list[EmbeddingSet], resolved: dict) -> Path:
    """Publish a cross-version ensemble as a new generation of its folder (one atomic swap)."""
    from clipfuse.classify import save_ensemble

    def fill(staging: Path) -> None:
        save_ensemble(ensemble, staging, extra={
            "classes": union.classes, "fingerprint": None, "n_fit_rows": len(union.ids),
            "versions": [version_record(v, len(es.ids)) for v, es in zip(versions, sets)]})
        np.save(staging / FIT_IDS_FILE, union.ids.astype("U"), allow_pickle=False)
        (staging / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))

    with store.writer("clipfuse train-heads"):
        return ensemble_folder(store, versions).replace(fill)


def list_ensembles(store: Store) -> list[dict]:
    """The saved cross-version ensembles of a store: their versions (``names``: comma-separated
    shorts, as ``--versions`` takes them; ``fingerprints``), heads and fused validation accuracy."""
    if store.is_local:
        names = sorted(link.name for link in (Path(store.uri) / "_heads").glob("ensemble-*")
                       if "." not in link.name)  # not the generations and staging folders beside the link
        where = str(Path(store.uri) / "_heads")
    elif store.uri.startswith("s3://"):
        names = sorted(n for n in store.object_folder("_heads").children() if n.startswith("ensemble-"))
        where = f"{store.uri.rstrip('/')}/_heads"
    else:
        return []
    found = []
    for name in names:
        _, meta = _saved(store_folder(store, f"_heads/{name}"))
        if meta is None:
            continue
        records = meta.get("versions") or []
        try:
            check_saved_versions(store, meta)
            stale = None
        except (LookupError, ValueError) as e:
            stale = str(e).split(";")[0]
        found.append({"names": ",".join(r["short"] for r in records), "stale": stale,
                      "fingerprints": [r["fingerprint"] for r in records], "heads": len(meta.get("heads", {})),
                      "fused_accuracy": (meta.get("val_scores", {}).get("fused") or {}).get("accuracy"),
                      "folder": f"{where}/{name}"})
    return found


def check_saved_versions(store: Store, meta: dict) -> None:
    """Fail, naming the version, when the store lost or remade a version the ensemble needs."""
    names = ",".join(r["short"] for r in meta["versions"])
    for record in meta["versions"]:
        try:
            v = store.get_version(record["fingerprint"], count_rows=False)  # the record alone: no row count
        except LookupError:
            v = None
        if v is None:
            raise LookupError(f"the ensemble over versions {names} needs version {record['short']} "
                              f"({record['model']}), which is no longer in the store {store.uri}; train the "
                              "ensemble again with `clipfuse train-heads --versions` over versions the store has "
                              "(see `clipfuse info`).")
        if record.get("created_at") is not None and v.created_at != record["created_at"]:
            raise ValueError(f"version {record['short']} ({record['model']}) was made again since the ensemble over "
                             f"versions {names} was trained, so its heads no longer match its vectors; run "
                             f"`clipfuse train-heads --versions {names}` again.")


def _saved(heads) -> tuple[Path | None, dict | None]:
    """The current generation of a heads folder and its saved metadata; (None, None) when there is none."""
    folder = heads.current()
    if folder is None or not (folder / ENSEMBLE_FILE).exists():
        return None, None
    return folder, json.loads((folder / ENSEMBLE_FILE).read_text())


def saved_meta(store: Store, versions: list[EmbeddingVersion]) -> dict | None:
    """The saved metadata of the ensemble over ``versions``, or None when none is trained."""
    return _saved(ensemble_folder(store, versions))[1]


def load_cross_trained(store: Store, versions: list[EmbeddingVersion], *,
                       notify: Callable[[Notice], None]) -> Trained:
    """The saved ensemble over ``versions``, its fitted rows mapped onto each version's current rows."""
    from clipfuse.classify import ViewRows, load_ensemble

    names = ",".join(v.short for v in versions)
    folder, meta = _saved(ensemble_folder(store, versions))
    if meta is None:
        raise FileNotFoundError(f"no ensemble trained over versions {names} in {store.uri}; run "
                                f"`clipfuse train-heads --versions {names}` first.")
    check_saved_versions(store, meta)
    order = [r["fingerprint"] for r in meta["versions"]]
    by_fp = {v.fingerprint: v for v in versions}
    versions = [by_fp[fp] for fp in order]  # the order they were trained in (the view names do not depend on it)
    sets = [store.load_embeddings(v.fingerprint) for v in versions]
    union, view_rows = merge_rows(sets)
    fit_ids = np.load(folder / FIT_IDS_FILE, allow_pickle=False)
    if meta.get("n_fit_rows") != len(fit_ids):
        raise ValueError(f"the saved ensemble in {folder} is incomplete (fitted rows and ids disagree); "
                         f"run `clipfuse train-heads --versions {names}` again.")
    ensemble, meta = load_ensemble(folder)  # the fitted vectors (X_fit_) are the store's: set below, not saved twice
    views = {}
    for v, es, rows in zip(versions, sets, view_rows):
        X_fit, fit_rows = remap_fitted(es, fit_ids[ensemble.view_rows_[v.short]])
        for name, spec in meta["heads"].items():
            if ensemble.views[name] == v.short and "attr:X_fit_" in spec["state"]:
                ensemble.heads[name].X_fit_ = X_fit
        views[v.short] = ViewRows(es.X, rows, fit_rows)
    check_classes(meta, union.classes, notify, f"clipfuse train-heads --versions {names}")
    report_missing(versions, sets, len(union.ids), notify)
    fit_position = {id_: i for i, id_ in enumerate(fit_ids)}
    fit_rows = np.array([fit_position.get(i, -1) for i in union.ids], dtype=np.int64)
    return Trained(ensemble, meta, union, fit_rows, folder, versions=versions, views=views, sets=sets,
                   fit_ids=fit_ids)


def resolve_versions(ws, versions, *, version=None) -> list[EmbeddingVersion] | None:
    """The versions ``--versions`` names, in order; None when it is not given.

    One name gives a list of one (the caller treats it as ``--version``); naming one
    version twice is an error.
    """
    names = parse_versions(versions)
    if names is None:
        return None
    if version is not None:
        raise OptionError("--versions", "give either --version (one version) or --versions (an ensemble over "
                                        "several), not both.")
    if not names:
        raise OptionError("--versions", "name two versions or more, e.g. --versions 3f2a9c0d,8b1e4f27 "
                                        "(fingerprints or prefixes; see `clipfuse info`).")
    found: list[EmbeddingVersion] = []
    for name in names:
        try:
            v = ws.version(name)
        except OptionError as e:
            raise OptionError("--versions", str(e).replace("--version ", "--versions ")) from e
        if any(f.fingerprint == v.fingerprint for f in found):
            raise OptionError("--versions", f"--versions names version {v.short} more than once ({name!r}); list "
                                            "each version once.")
        found.append(v)
    return found
