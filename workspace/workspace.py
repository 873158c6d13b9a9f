"""The workspace: one store and every workflow on it, one method per command (``clipfuse.open``)."""

from __future__ import annotations

import contextlib

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

from clipfuse.embed.names import version_precision
from clipfuse.store import EmbeddingVersion, Store

from . import crossversion
from . import heads as _heads
from .models import (check_decode, check_device, embedder_config, load_embedder, named_as_store_version,
                     version_embedder, version_model)
from .queries import describe_neighbors, resolve_query
from .labeling import Labeling
from .review import Reviewing
from .tuning import Tuning
from .results import (
    EvaluateResult,
    ExportResult,
    ImportResult,
    IndexResult,
    InfoResult,
    NeighborsResult,
    Notice,
    OptionError,
    PredictResult,
    Progress,
    RemoveVersionResult,
    TrainResult,
)

EXPORT_SPLITS = ("unlabeled", "test", "all")
EXPORT_FORMATS = ("clipfuse", "kaggle")
GRAPHS = ("auto", "exact", "ivf", "hnsw")
MIB = 2**20


def _finite(value):
    """``value`` with NaN/inf floats replaced by None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _head_list(heads) -> list[str] | None:
    """``heads`` as a list: None stays None, "a,b" and ["a", "b"] give ["a", "b"]."""
    if heads is None:
        return None
    items = heads.split(",") if isinstance(heads, str) else list(heads)
    return [h.strip() for h in items if h.strip()]


class Workspace(Labeling, Reviewing, Tuning):
    """One clipfuse store and the workflows on it.

    Parameters
    ----------
    db : str or path, default "clipfuse.lance"
        The store's folder (created by the first ``index`` or ``import_embeddings``), a
        ``file:///`` URI of one, or ``memory://`` (one process only).
    on_notice : callable(Notice), optional
        Called with each warning as it happens (the CLI prints them); every result also
        lists its notices. A notice of kind ``lock-wait`` says another writer holds the store.
    lock_timeout : float, optional
        Seconds a write waits for another writer; None waits as long as it takes.
    storage_options : dict, optional
        For a store on object storage (``s3://bucket/prefix``): LanceDB storage options
        (``endpoint``, ``region``, ``aws_access_key_id``...) over the standard ``AWS_*``
        variables; an ``http://`` endpoint allows plain http.

    Notes
    -----
    Methods mirror the CLI's commands; keyword names are its options in snake_case. Long
    steps take ``progress(stage, done, total)``. Nothing is printed; errors are built-in
    exception types (``ValueError``, ``LookupError``, ``FileNotFoundError``...), and a
    wrong option value raises :class:`OptionError` (a ValueError) naming the option.
    """

    def __init__(self, db: str | os.PathLike = "clipfuse.lance", *, on_notice: Callable[[Notice], None] | None = None,
                 lock_timeout: float | None = None, storage_options: dict[str, str] | None = None):
        try:
            self.store = Store(db, lock_timeout=lock_timeout, on_lock_wait=self._lock_wait,
                               storage_options=storage_options)
        except NotADirectoryError as e:
            raise OptionError("--db", str(e).replace("--db ", "", 1)) from e
        self.db = Path(self.store.uri) if self.store.is_local else self.store.uri  # file:// URIs as their folder
        self.on_notice = on_notice
        self._notices: list[Notice] = []

    def __repr__(self) -> str:
        return f"Workspace({str(self.db)!r})"

    # ---- plumbing --------------------------------------------------------------------------------
    def _notify(self, notice: Notice) -> None:
        self._notices.append(notice)
        if self.on_notice is not None:
            self.on_notice(notice)

    def _warn(self, message: str) -> None:
        self._notify(Notice(message))

    def _lock_wait(self, holder: str) -> None:
        self._notify(Notice(f"the store {self.db} is being written by {holder}; waiting for it to finish "
                            "(Ctrl-C to stop) ...", kind="lock-wait"))

    def _start(self) -> list[Notice]:
        self._notices = []
        return self._notices

    def _require_store(self) -> None:
        if isinstance(self.db, Path) and not self.db.exists():
            raise FileNotFoundError(f"no store at {str(self.db)!r}; run `clipfuse index ... --db {self.db}` first, "
                                    "or pass the right --db.")

    def version(self, version: str | EmbeddingVersion | None = None) -> EmbeddingVersion:
        """The version ``version`` names (fingerprint or unique prefix), else the active one.

        A name that matches none of the store's versions raises :class:`OptionError`.
        """
        self._require_store()
        try:
            return self.store.get_version(version)
        except LookupError as e:
            if version is not None and self.store.versions():
                raise OptionError("--version", str(e)) from e
            raise

    def versions(self) -> list[EmbeddingVersion]:
        """Every embedding version, oldest first."""
        return self.store.versions() if self.store.exists else []

    def remove_version(self, version: str) -> RemoveVersionResult:
        """Delete one embedding version: its vectors, predictions, neighbour index and heads.

        The images, labels and other versions stay. When it was the active version, the one
        finished (or activated) last before it becomes active. A saved ensemble over several
        versions that needs it stays on disk but fails with a clear error until retrained.
        """
        notices = self._start()
        if version is None or not str(version).strip():
            raise OptionError("VERSION", "name the version to remove (a fingerprint or prefix; see `clipfuse info`).")
        try:
            v = self.version(version)
        except OptionError as e:
            raise OptionError("VERSION", str(e)) from e
        with self.store.writer("clipfuse remove-version"):
            using = [e for e in crossversion.list_ensembles(self.store) if v.fingerprint in e["fingerprints"]]
            for e in using:  # their predictions would be stale: dropped first
                self.store.remove_predictions(versions=e["fingerprints"])
            ensembles = [e["names"] for e in using]
            removed = self.store.remove_version(v.fingerprint)
            try:
                active = self.store.get_version(None, count_rows=False).fingerprint
            except LookupError:
                active = None
        for names in ensembles:
            self._warn(f"the ensemble over versions {names} needed version {v.short}; `clipfuse train-heads "
                       "--versions` over the versions left trains it again.")
        return RemoveVersionResult(removed=removed, active=active, ensembles=ensembles, notices=notices)

    # ---- index -------------------------------------------------------------------------------------
    def index(self, labeled_dir=None, *, unlabeled=None, test=None, model: str | None = None,
              pretrained: str | None = None, device: str = "auto", precision: str | None = None,
              decode: str | None = None, batch_size: int = 32,
              workers: int | None = None, allow_random_weights: bool = False, commit_every: int = 512,
              max_file_size: int = 512, ray: str | None = None, ray_workers: int | None = None,
              gpus_per_worker: float | None = None, progress: Progress | None = None) -> IndexResult:
        """Embed every new or changed image once into the store (see ``clipfuse index --help``).

        ``labeled_dir`` has one sub-folder per class; ``unlabeled`` and ``test`` are
        folders of images (``test`` may have class sub-folders); any of them may be a folder on
        object storage (``s3://bucket/train``). ``max_file_size`` is in MiB.

        ``precision`` (fp32, int8 on CPU, fp16 / bf16 on GPU) and ``decode`` (full, draft) default to the
        store version's own when the store's model runs, else fp32 and full; int8 and draft make versions of
        their own.

        ``ray`` (``"local"``, ``"auto"`` or a cluster address) embeds on a Ray cluster: an actor pool
        of ``ray_workers`` model replicas with ``gpus_per_worker`` GPUs each; this process lists the
        files, skips what the store holds and commits every ``commit_every`` images.
        """
        from clipfuse.data import scan_folders
        from clipfuse.data.remote import is_uri

        notices = self._start()
        if labeled_dir is None and unlabeled is None and test is None:
            raise OptionError("LABELED_DIR", "give a LABELED_DIR and/or --unlabeled DIR / --test DIR.")
        for option, folder in (("LABELED_DIR", labeled_dir), ("--unlabeled", unlabeled), ("--test", test)):
            if folder is None or is_uri(str(folder)):
                continue
            if "://" in str(folder):
                raise OptionError(option, f"{str(folder)!r}: only folders on this machine and on s3://, gs:// or az:// "
                                          "are read.")
            if not Path(folder).is_dir():
                raise OptionError(option, f"{str(folder)!r} is not a folder of images.")
        if commit_every < 1:
            raise OptionError("--commit-every", f"must be at least 1, got {commit_every}.")
        check_decode(decode)
        store = self.store
        # what the model runs as: asked for, else the store version's own (only resolved here: nothing loads)
        config = embedder_config(store, model=model, pretrained=pretrained, device=device, precision=precision,
                                 decode=decode, batch_size=batch_size, workers=workers,
                                 allow_random_weights=allow_random_weights, max_file_bytes=max_file_size * MIB)
        if precision is None and config.precision == "int8" and (
                device not in ("auto", "cpu") or ray is not None and gpus_per_worker):
            raise OptionError("--device" if ray is None else "--gpus-per-worker",
                              "the store's version of this model is int8, which runs on the CPU only; use "
                              "--device cpu (--gpus-per-worker 0 with --ray), or --precision fp32 / fp16 / bf16 "
                              "for a version of its own.")
        ray_config = None
        if ray is not None:
            ray_config = self._ray_config(ray, ray_workers, gpus_per_worker, device, config.precision)
            # this process loads the model only to fingerprint it (int8 is part of the fingerprint)
            config = dataclasses.replace(config, device="cpu", precision=version_precision(config.precision))
        elif ray_workers is not None or gpus_per_worker is not None:
            raise OptionError("--ray-workers" if ray_workers is not None else "--gpus-per-worker",
                              "is an option of Ray runs; add --ray local|auto|ADDRESS.")
        check_device(config.device, config.precision)

        def scan():
            return scan_folders(labeled_dir, unlabeled=unlabeled, test=test,
                                known_classes=None if store.is_empty else store.classes(),
                                storage_options=store.folder_storage_options)

        scan()  # a layout mistake fails now, before the model loads
        with contextlib.ExitStack() as stack:
            if ray_config is not None:  # connected first: a cluster that can't be reached fails before the model loads
                from clipfuse.store.rayindex import check_cluster, connect, disconnect, plan_workers

                try:
                    if connect(ray_config.address):
                        stack.callback(disconnect)
                except ValueError as e:
                    raise OptionError("--ray", str(e)) from e
                try:
                    plan_workers(ray_config)  # the cluster can run what was asked, before anything is written
                    local = any(not is_uri(str(f)) for f in (labeled_dir, unlabeled, test) if f is not None)
                    for note in check_cluster(ray_config.address, store, local):
                        self._warn(note)
                except ValueError as e:
                    option = next((o for o in ("--precision", "--gpus-per-worker", "--ray-workers") if o in str(e)),
                                  "--ray")
                    raise OptionError(option, str(e)) from e
            embedder = load_embedder(config, notify=self._notify, progress=progress)
            if model is None:
                embedder = named_as_store_version(store, embedder)
            with store.writer("clipfuse index" + (" --ray" if ray_config else "")):
                # listed again under the lock: a run that waited for another writer sees the files as they are now,
                # so it never removes the rows of files that appeared meanwhile
                folders = scan()
                summary = self._run_index(embedder, folders, commit_every=commit_every, progress=progress,
                                          ray=ray_config)
        return IndexResult(db=str(self.db), summary=summary, model=embedder.config.model,
                           random_weights=embedder.info.random_weights, skipped_folders=list(folders.skipped),
                           notices=notices)

    def _ray_config(self, ray: str, ray_workers, gpus_per_worker, device: str, precision: str):
        from clipfuse.store.rayindex import RayConfig

        if not str(ray).strip():
            raise OptionError("--ray", "give local, auto or a Ray cluster address (ray://head:10001 or head:6379).")
        if self.store.uri.startswith("memory://"):
            raise OptionError("--db", "a memory:// store lives in this process only; Ray runs need a folder or s3://.")
        if device != "auto":
            raise OptionError("--device", "with --ray the model runs on the Ray workers; choose their GPUs with "
                                          "--gpus-per-worker (0 for CPU workers) instead of --device.")
        if ray_workers is not None and ray_workers < 1:
            raise OptionError("--ray-workers", f"must be at least 1, got {ray_workers}.")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise OptionError("--gpus-per-worker", f"must be 0 or more, got {gpus_per_worker}.")
        if precision == "int8" and gpus_per_worker is None:
            gpus_per_worker = 0.0  # int8 runs on CPU workers
        return RayConfig(address=str(ray).strip(), workers=ray_workers, gpus_per_worker=gpus_per_worker,
                         precision=precision)

    def _run_index(self, embedder, folders, *, commit_every: int, progress: Progress | None, ray=None):
        from clipfuse.store import IndexConfig, index_images

        for path, reason in folders.skipped[:10]:
            self._warn(f"skipped {path}: {reason}")
        if len(folders.skipped) > 10:
            self._warn(f"... and {len(folders.skipped) - 10} more folders not entered")
        report = None if progress is None else (lambda done, total: progress("indexing", done, total))
        summary = index_images(self.store, embedder, folders.files, folders.classes, roots=folders.roots,
                               config=IndexConfig(commit_every=commit_every), progress=report, ray=ray)
        if summary.repaired:
            self._warn("repaired the store first: removed " + ", ".join(
                f"{n} duplicate {kind} row(s)" for kind, n in summary.repaired.items())
                + " (written by two commands at once before the store had a writer lock)")
        return summary

    # ---- neighbours and info -------------------------------------------------------------------------
    def neighbors(self, query: str | os.PathLike | None = None, *, text: str | None = None, k: int = 10,
                  version: str | None = None, model: str | None = None, pretrained: str | None = None,
                  device: str = "auto", exact: bool | None = None) -> NeighborsResult:
        """Nearest neighbours of an image (a file or an image id) or of a ``text``, by cosine similarity.

        A stored image is answered from its stored vector, without loading any model.
        """
        notices = self._start()
        if (query is None) == (text is None):
            raise OptionError("IMAGE_OR_ID", "give either an IMAGE_OR_ID argument or --text, not both or neither.")
        if k < 1:
            raise OptionError("--k", f"k must be at least 1, got {k}.")
        check_device(device, model_loads=model is not None or text is not None)
        v = self.version(version)
        if model == v.model and pretrained is None:
            pretrained = v.pretrained
        model_config = None
        if model is not None:
            from clipfuse.embed import EmbedderConfig  # torch: only when a model is asked for

            model_config = EmbedderConfig(model=model, pretrained=pretrained, device=device)
        vector, described = resolve_query(self.store, v, None if query is None else str(query), text,
                                          model_config=model_config, device=device, notify=self._notify)
        found, sims = self.store.search(vector, k=k, fingerprint=v.fingerprint, exact=exact)
        return NeighborsResult(query=described, version=v.fingerprint,
                               neighbors=describe_neighbors(self.store, found[0], sims[0]), notices=notices)

    def info(self, *, errors: bool = False) -> InfoResult:
        """What the store holds: tables, images per split and class, versions, index errors."""
        notices = self._start()
        self._require_store()
        summary = self.store.info()
        versions = [EmbeddingVersion.from_row(v) for v in summary["versions"]]  # counted once, by store.info()
        error_list = self.store.errors().select(["path", "reason"]).to_pylist() if errors else None
        dups = {kind: n for kind, n in summary["duplicates"].items() if n}
        if dups:
            self._warn("duplicate rows: " + ", ".join(f"{n} {kind}" for kind, n in dups.items())
                       + " (written by two commands at once before the store had a writer lock; reads count "
                       "each once, and the next `clipfuse index` removes them)")
        return InfoResult(uri=summary["uri"], tables=summary["tables"], images=summary["images"],
                          unique_images=summary["unique_images"], per_split=summary["per_split"],
                          per_class=summary["per_class"], versions=versions, active=summary["active"],
                          errors=summary["errors"], duplicates=summary["duplicates"], error_list=error_list,
                          ensembles=crossversion.list_ensembles(self.store),
                          labels_by_source=summary["labels_by_source"], notices=notices)

    def import_embeddings(self, source, *, metadata=None, image_root=None, split: str = "unlabeled",
                          model: str | None = None, pretrained: str | None = None,
                          device: str = "auto") -> ImportResult:
        """Bring precomputed embeddings in: a clip-retrieval output folder, or a ``.npy`` file of
        vectors with ``metadata`` (parquet/CSV, one row per vector)."""
        from clipfuse.embed import EmbedderConfig
        from clipfuse.store import import_embeddings as run_import
        from clipfuse.store import read_clip_retrieval, read_npy_table

        notices = self._start()
        source = Path(source)
        if split not in ("labeled", "unlabeled", "test"):
            raise OptionError("--split", f"split must be labeled, unlabeled or test; got {split!r}.")
        if not source.exists():
            raise OptionError("SOURCE", f"SOURCE {str(source)!r} does not exist.")
        if source.is_dir():
            if metadata is not None:
                raise OptionError("--metadata", "--metadata goes with a .npy SOURCE, not a clip-retrieval folder.")
            data = read_clip_retrieval(source)
        elif source.suffix == ".npy":
            if metadata is None:
                raise OptionError("--metadata", "a .npy SOURCE needs --metadata FILE (parquet or CSV) with one row "
                                                "per vector.")
            data = read_npy_table(source, metadata)
        else:
            raise OptionError("SOURCE", f"SOURCE {str(source)!r} must be a clip-retrieval folder or a .npy file.")
        model_info = None
        if model is not None:
            check_device(device)
            embedder = load_embedder(EmbedderConfig(model=model, pretrained=pretrained, device=device),
                                     notify=self._notify)
            model_info = embedder.info.to_dict()
        r = run_import(self.store, data, model_info=model_info, image_root=image_root, split=split)
        if r["duplicate_ids"] or r["duplicate_paths"]:
            self._warn(f"{r['duplicate_ids']} row(s) repeat a content id (the first vector of each id is kept"
                       + (f"; {r['conflicting_ids']} came with a different vector" if r["conflicting_ids"] else "")
                       + f") and {r['duplicate_paths']} repeat a path (the first row is kept), e.g. {r['example']}")
        return ImportResult(db=str(self.db), fingerprint=r["fingerprint"], rows=r["rows"], dim=data.vectors.shape[1],
                            images=r["images"], hashed=r["hashed"], duplicate_ids=r["duplicate_ids"],
                            conflicting_ids=r["conflicting_ids"], duplicate_paths=r["duplicate_paths"],
                            example=r["example"], notices=notices)

    # ---- the classifier stack --------------------------------------------------------------------------
    def train_heads(self, *, version: str | None = None, versions=None, heads: str | Iterable[str] | None = None,
                    class_words=None, val_fraction: float = 0.2, seed: int = 0, folds: int = 3, graph: str = "auto",
                    probe_zero_shot_prior: bool = False, device: str = "auto", text_embeddings=None,
                    progress: Progress | None = None) -> TrainResult:
        """Fit the classifier heads and their fusion on a version; save them beside the store.

        Every head is fitted on the seeded split's train labels, scored on its held-out
        labels and refitted on all labels; the fusion learns from out-of-fold predictions.

        ``versions`` (``"a,b"`` or a list of fingerprints/prefixes) fits the heads on each of
        several versions of the same images instead, matched by id, and one fusion over
        every (version, head) pair on one shared split; ``predict``, ``evaluate`` and
        ``export`` take the same ``versions``. An image one version lacks is predicted from
        the versions that hold it (a notice says which and how to fill it).

        ``class_words`` is one YAML/JSON file or a list of them: one zero-shot head per file
        (``zero-shot:<file stem>``); the linear probe and kNN cache use their mean.
        ``text_embeddings`` (n_classes, dim), unit rows in class order, stand in for the
        version's own text tower (e.g. prompts embedded elsewhere for imported vectors);
        with ``versions``, a dict of version (fingerprint or prefix) -> such an array.
        """
        from clipfuse.classify import DEFAULT_HEADS, HeadsConfig

        notices = self._start()
        names = DEFAULT_HEADS if heads is None else tuple(_head_list(heads))
        if not 0.0 < val_fraction < 1.0:
            raise OptionError("--val-fraction", f"val_fraction must be between 0 and 1 (the share of each class's "
                                                f"labels held out); got {val_fraction}.")
        if folds < 2:
            raise OptionError("--folds", f"folds must be at least 2 (the fusion learns from out-of-fold "
                                         f"predictions); got {folds}.")
        if graph not in GRAPHS:
            raise OptionError("--graph", f"--graph must be auto, exact, ivf or hnsw; got {graph!r}.")
        word_lists = self._word_lists(class_words)
        try:
            config = HeadsConfig(heads=names, val_fraction=val_fraction, seed=seed, n_folds=folds, graph=graph,
                                 probe_zero_shot_prior=probe_zero_shot_prior,
                                 class_words=(word_lists[0] if len(word_lists) == 1 else word_lists) or None)
        except ValueError as e:
            raise OptionError("--heads", str(e)) from e
        check_device(device)
        several = crossversion.resolve_versions(self, versions, version=version)
        if several is not None and len(several) == 1:
            version, several = several[0].fingerprint, None
        if several is None:
            if isinstance(text_embeddings, dict):
                raise OptionError("text_embeddings", "a dict of text embeddings goes with versions=[...]; for one "
                                                     "version pass one (n_classes, dim) array.")
            v = self.version(version)
            with self.store.writer("clipfuse train-heads"):  # taken first: an unwritable store fails before fitting
                ensemble, folder = self._fit_heads(v, config, device=device, progress=progress, text=text_embeddings)
            return self._train_result([v], ensemble, folder, notices)
        with self.store.writer("clipfuse train-heads"):
            ensemble, folder, missing = self._fit_cross(several, config, device=device, progress=progress,
                                                        text=text_embeddings)
        return self._train_result(several, ensemble, folder, notices, missing=missing)

    @staticmethod
    def _word_lists(class_words) -> tuple[str, ...]:
        """The class-words files given (one path or several), checked: they exist and their stems,
        which name the zero-shot heads, differ."""
        if class_words is None:
            return ()
        paths = [class_words] if isinstance(class_words, (str, os.PathLike)) else list(class_words)
        for p in paths:
            if not Path(p).is_file():
                raise OptionError("--class-words", f"class words file {str(p)!r} does not exist.")
        stems = [Path(p).stem for p in paths]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise OptionError("--class-words", f"two class-words files are named {repeated[0]!r} (the zero-shot head of "
                                               "each file is named after it); rename one.")
        return tuple(str(p) for p in paths)

    def _fit_heads(self, version: EmbeddingVersion, config, *, device: str, embedder=None, progress=None, text=None):
        from clipfuse.classify import create_ensemble_from_config

        es = self.store.load_embeddings(version.fingerprint)
        if es.conflicts:
            self._warn(f"{len(es.conflicts)} image(s) are filed under two classes and count as unlabeled, "
                       f"e.g. id {es.conflicts[0]}")
        _heads.require_labels(self.store, version, es)
        given = self._version_heads(version, es.classes, config, device=device, embedder=embedder, text=text)
        ensemble = create_ensemble_from_config(config, len(es.classes), given["class_embeddings"],
                                               given["finetuned_head"], given["finetuned_bias"])
        self._fit_ensemble(ensemble, es.X, es.labels, config, progress)
        self._explain_unavailable(ensemble, {None: given["reasons"]})
        resolved = _heads.resolved_config(config, version, es, text=given["class_embeddings"] is not None)
        folder = _heads.save_heads(self.store, version, ensemble, es, resolved)
        return ensemble, folder

    def _fit_cross(self, versions: list[EmbeddingVersion], config, *, device: str, progress=None, text=None):
        """Heads on each version of the same images and one fusion over all of them (see ``train_heads``)."""
        import time

        import numpy as np

        from clipfuse.classify import ViewRows, create_ensemble_from_config

        texts = self._texts_by_version(versions, text)
        dims = {v.dim for v in versions}
        sets = [self.store.load_embeddings(v.fingerprint) for v in versions]
        union, view_rows = crossversion.merge_rows(sets)
        if union.conflicts:
            self._warn(f"{len(union.conflicts)} image(s) are filed under two classes and count as unlabeled, "
                       f"e.g. id {union.conflicts[0]}")
        crossversion.require_view_labels(versions, sets, union)  # first: it names the version that lacks labels
        _heads.require_labels(self.store, versions[0], union)
        missing = crossversion.report_missing(versions, sets, len(union.ids), self._notify)
        given = {v.short: self._version_heads(v, union.classes, config, device=device, text=texts.get(v.fingerprint))
                 for v in versions}
        ensemble = create_ensemble_from_config(
            config, len(union.classes),
            views={view: {k: g[k] for k in ("class_embeddings", "finetuned_head", "finetuned_bias")}
                   for view, g in given.items()})
        views = {v.short: ViewRows(es.X, rows) for v, es, rows in zip(versions, sets, view_rows)}
        self._fit_ensemble(ensemble, views, union.labels, config, progress)
        self._explain_unavailable(ensemble, {view: g["reasons"] for view, g in given.items()})
        resolved = {**dataclasses.asdict(config), "versions": [v.fingerprint for v in versions],
                    "models": [v.model for v in versions], "dims": sorted(dims), "rows": len(union.ids),
                    "labeled": int(np.sum(union.labels >= 0)), "classes": union.classes, "trained_at": time.time(),
                    "text_embeddings": {v.short: given[v.short]["class_embeddings"] is not None for v in versions}}
        folder = crossversion.save_cross_heads(self.store, versions, ensemble, union, sets, resolved)
        return ensemble, folder, missing

    def _texts_by_version(self, versions: list[EmbeddingVersion], text) -> dict:
        """``text_embeddings`` of a cross-version fit: {fingerprint or prefix: array} -> {fingerprint: array}."""
        if text is None:
            return {}
        if not isinstance(text, dict):
            raise OptionError("text_embeddings", "with versions=[...], text_embeddings is a dict of version "
                                                 "(fingerprint or prefix) -> (n_classes, dim) array.")
        out = {}
        for key, value in text.items():
            matches = [v for v in versions if v.fingerprint.startswith(str(key))]
            if len(matches) != 1:
                raise OptionError("text_embeddings", f"text_embeddings key {key!r} names "
                                                     f"{'several' if matches else 'none'} of the versions "
                                                     f"{', '.join(v.short for v in versions)}.")
            out[matches[0].fingerprint] = value
        return out

    def _version_heads(self, version: EmbeddingVersion, classes: list[str], config, *, device: str, embedder=None,
                       text=None) -> dict:
        """What a version's heads are made with: its class text embeddings (one array, or one per
        word list), its finetuned classifier, and why any of them is missing."""
        import numpy as np

        reasons = {}
        if text is not None:
            text = np.asarray(text, dtype=np.float32)
            if text.shape != (len(classes), version.dim):
                raise OptionError("text_embeddings", f"text_embeddings of version {version.short} must have shape "
                                                     f"({len(classes)}, {version.dim}) (classes x dim), got "
                                                     f"{text.shape}.")
        elif any(h in config.heads for h in ("zero-shot", "knn", "probe")):
            text, reasons["zero-shot"] = self._text_embeddings(version, classes, config.word_lists, device, embedder)
        finetuned, reasons["finetuned"] = _heads.finetuned_head(version, classes, version_model(self.store, version)) \
            if "finetuned" in config.heads else (None, None)
        if finetuned is not None:
            self._warn(f"note: the model of version {version.short} was finetuned and WiSE-FT-selected on the same "
                       "validation labels, so validation scores here are optimistic.")
        return {"class_embeddings": text, "finetuned_head": finetuned[0] if finetuned else None,
                "finetuned_bias": finetuned[1] if finetuned else None, "reasons": reasons}

    @staticmethod
    def _fit_ensemble(ensemble, X, y, config, progress) -> None:
        """Fit, reporting each head fit as one step of ``heads x (folds + train split + refit)``."""
        total = len(ensemble.heads) * (config.n_folds + 1 + int(config.refit))
        done = 0

        def report(head, stage, step, steps):
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"{head}: {stage}", min(done - 1, total), total)

        ensemble.fit(X, y, progress=report)
        if progress is not None:
            progress("heads fitted", total, total)

    @staticmethod
    def _explain_unavailable(ensemble, reasons: dict) -> None:
        """Replace a skipped head's generic reason with the version's own (no text tower, not finetuned)."""
        for member in list(ensemble.unavailable_):
            view, _, head = member.rpartition("/")
            why = reasons.get(view or None, {})
            kind = head.split(":")[0]
            if why.get(kind):
                ensemble.unavailable_[member] = why[kind]

    def _text_embeddings(self, version: EmbeddingVersion, classes: list[str], word_lists, device: str, embedder=None):
        """Class text embeddings of the version's model (a dict of list name -> array when several word
        lists are given), or (None, reason) when it has no usable text tower."""
        from clipfuse.embed import PretrainedWeightsError, class_text_embeddings

        lists = list(word_lists) or [None]
        words = {p: _heads.class_words(p, classes, notify=self._notify) for p in lists}
        if version.imported:
            return None, f"version {version.short} was imported without a model, so there is no text tower"
        if version.image_only:
            return None, f"{version.model} is an image-only backbone: it has no text tower"
        try:
            if embedder is None or embedder.fingerprint != version.fingerprint:
                embedder = version_embedder(version, None, device, notify=self._notify, store=self.store)
            embedded = {Path(p).stem if p else "folder-names": class_text_embeddings(embedder, classes, words[p])
                        for p in lists}
        except (PretrainedWeightsError, ValueError, OSError) as e:
            return None, str(e).splitlines()[0]
        return (next(iter(embedded.values())) if len(embedded) == 1 else embedded), None

    @staticmethod
    def _train_result(versions: list[EmbeddingVersion], ensemble, folder: Path, notices, missing=None) -> TrainResult:
        several = len(versions) > 1
        return TrainResult(version="+".join(v.fingerprint for v in versions), folder=folder,
                           heads=list(ensemble.head_names_), scores=ensemble.val_scores_,
                           weights=dict(ensemble.weights_), fit_seconds=dict(ensemble.fit_seconds_),
                           unavailable=dict(ensemble.unavailable_), n_train=len(ensemble.train_idx_),
                           n_val=len(ensemble.val_idx_), versions=[v.fingerprint for v in versions] if several else [],
                           version_scores=dict(ensemble.view_scores_) if several else {}, missing=missing or {},
                           fusion_rule=getattr(ensemble, "fusion_rule_", "weighted"),
                           notices=notices)

    def _trained(self, version, versions) -> tuple[list[EmbeddingVersion], _heads.Trained]:
        """The saved heads of ``version`` or the ensemble over ``versions``, reloaded."""
        several = crossversion.resolve_versions(self, versions, version=version)
        if several is not None and len(several) == 1:
            version, several = several[0].fingerprint, None
        if several is None:
            v = self.version(version)
            return [v], _heads.load_trained(self.store, v, notify=self._notify)
        trained = crossversion.load_cross_trained(self.store, several, notify=self._notify)
        return trained.versions, trained

    def _resolve_head_names(self, names: list[str] | None, ensemble) -> list[str] | None:
        """``--heads`` of predict: trained head names; over several versions a bare head name
        (``probe``) picks that head of every version."""
        if names is None:
            return None
        if names == []:
            raise OptionError("--heads", f"name at least one head; the trained heads are "
                                         f"{', '.join(ensemble.head_names_)}.")
        known = list(ensemble.head_names_) + list(ensemble.unavailable_)
        picked, unknown = [], []
        for name in names:
            hits = [h for h in known if h == name or h.split("/", 1)[-1] == name
                    or h.split("/", 1)[-1].split(":")[0] == name]
            (picked.extend(hits) if hits else unknown.append(name))
        if unknown:
            raise OptionError("--heads", f"unknown head(s) {', '.join(unknown)}; the trained heads are "
                                         f"{', '.join(ensemble.head_names_)}.")
        return list(dict.fromkeys(picked))

    @staticmethod
    def _require_answered(trained, names: list[str] | None) -> None:
        """Over several versions, the chosen heads must answer for every image: an image held only
        by versions none of whose heads were chosen would get a made-up (chance) prediction."""
        if trained.views is None or names is None:
            return
        import numpy as np

        chosen = {trained.ensemble.views[h] for h in names}
        answered = np.zeros(len(trained.es.ids), dtype=bool)
        for view, vr in trained.views.items():
            if view in chosen:
                answered[vr.rows] = True
        if not answered.all():
            others = sorted(set(trained.views) - chosen)
            raise OptionError("--heads", f"the heads chosen belong to versions that lack {int((~answered).sum())} of "
                                         f"the images; add a head of version {', '.join(others)} (or leave --heads "
                                         "out) so that every image is predicted.")

    def predict(self, *, version: str | None = None, versions=None, heads: str | Iterable[str] | None = None,
                per_head: bool = False, progress: Progress | None = None) -> PredictResult:
        """Run the trained heads and fusion over every image of the version (or of the ensemble
        over ``versions``); write its predictions table (with an OOD score per image, see
        :func:`clipfuse.classify.ood_scores`).

        ``heads`` fuses a subset of the trained heads; ``per_head`` adds one probability
        column per head (``probs_<head>``) to the table.
        """
        notices = self._start()
        names = _head_list(heads)
        with self.store.writer("clipfuse predict"):
            used, trained = self._trained(version, versions)
            names = self._resolve_head_names(names, trained.ensemble)
            self._require_answered(trained, names)
            if progress is not None:
                progress(f"predicting {len(trained.es.ids)} images", 0, None)
            # the OOD score reads the fused probabilities before the move to the pool's class proportions:
            # that move sharpens distractors toward the common classes, which would hide them
            raw, probs = trained.predict(names, shift=False)
            fused = trained.ensemble.to_pool_priors(raw)
            table = _heads.predictions_table(trained.es, fused, probs if per_head else {}, trained.classes,
                                             ood=_heads.ood_column(trained, raw))
            name = self.store.write_predictions(table, used[0].fingerprint,
                                                versions=[v.fingerprint for v in used] if len(used) > 1 else None)
        return PredictResult(version="+".join(v.fingerprint for v in used), table=name, images=len(trained.es.ids),
                             new_since_training=trained.new_rows, heads=list(probs),
                             mean_confidence=float(fused.max(axis=1).mean()) if len(fused) else float("nan"),
                             per_head=per_head, versions=[v.fingerprint for v in used] if len(used) > 1 else [],
                             notices=notices)

    def evaluate(self, *, version: str | None = None, versions=None, out="clipfuse-eval",
                 top_confusions: int = 10) -> EvaluateResult:
        """Score the trained heads on their held-out labels (and the fused predictions on labeled
        test images); write ``metrics.json``, ``confusions.csv`` (the most-confused class pairs on
        validation, with their class-mean similarity and example paths) and the plots into ``out``."""
        import numpy as np

        from clipfuse.classify import plot_class_similarity, plot_confusion, score_predictions
        from clipfuse.classify.metrics import expected_calibration_error, plot_risk_coverage
        from clipfuse.data import write_text_atomic

        notices = self._start()
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise OptionError("--out", f"{str(out)!r} is a file; --out takes a folder for metrics.json and the plots.")
        if top_confusions < 0:
            raise OptionError("--top-confusions", f"--top-confusions must be 0 or more; got {top_confusions}.")
        used, trained = self._trained(version, versions)
        ensemble, es, classes = trained.ensemble, trained.es, trained.classes
        y_val = ensemble.val_labels_  # the labels as they were at train-heads time
        scores = {h: score_predictions(y_val, P) for h, P in ensemble.val_proba_.items()}
        order = [h for h in ensemble.head_names_ if h in scores] + ["fused"]
        scores = {h: scores[h] for h in order}
        out.mkdir(parents=True, exist_ok=True)
        X_labeled, y_labeled = trained.labeled_vectors()
        files = [plot_class_similarity(X_labeled, y_labeled, classes, out / "class_similarity.png")]
        confusions, calibration = [], {}
        if len(y_val):
            val_pred = ensemble.val_proba_["fused"].argmax(1)
            files.insert(0, plot_confusion(y_val, val_pred, classes, out / "confusion_val.png"))
            confusions = self._confusions(trained, y_val, val_pred, X_labeled, y_labeled, top_confusions)
            files.append(self._write_confusions(out / "confusions.csv", confusions))
            raw = getattr(ensemble, "val_fused_raw_", None)
            calibration = {"temperature": float(getattr(ensemble, "temperature_", 1.0)),
                           "ece_before": None if raw is None else expected_calibration_error(raw, y_val),
                           "ece_after": expected_calibration_error(ensemble.val_proba_["fused"], y_val)}
            curves = {"fused": (ensemble.val_proba_["fused"], y_val)}
            curves.update({h: (P, y_val) for h, P in ensemble.val_proba_.items() if h != "fused"})
            files.append(plot_risk_coverage(curves, out / "risk_coverage.png"))
        else:
            self._warn("no held-out labels: every class had a single label at train-heads time, so nothing could "
                       "be scored. The fused predictions are the graph head's (Poisson learning), the method "
                       "built for one label per class; label a second image of some classes for held-out scores.")
        fusion = {"rule": getattr(ensemble, "fusion_rule_", "weighted"),
                  "rule_scores": getattr(ensemble, "rule_scores_", {})}
        priors = self._priors_report(ensemble, classes)
        report = {"fingerprint": used[0].fingerprint if len(used) == 1 else None,
                  "versions": [v.fingerprint for v in used], "classes": classes, "validation": scores,
                  "weights": ensemble.weights_, "unavailable": ensemble.unavailable_,
                  "version_scores": ensemble.view_scores_ if len(used) > 1 else {}, "confusions": confusions,
                  "calibration": calibration, "fusion": fusion, "priors": priors}
        test = (es.test_labels >= 0) & (es.test_labels < len(classes))  # classes added later: not scored
        later = int(np.sum(es.test_labels >= len(classes)))
        if later:
            self._warn(f"{later} labeled test image(s) belong to classes added after train-heads "
                       f"({', '.join(es.classes[len(classes):][:5])}) and are not scored; run `clipfuse "
                       "train-heads` and `clipfuse predict` again to score them.")
            report["test_skipped_new_classes"] = later
        test_scores, n_test = None, 0
        predictions = self.store.predictions(used[0].fingerprint,
                                             versions=[v.fingerprint for v in used] if len(used) > 1 else None)
        if test.any() and predictions is not None:
            pred_index = {id_: i for i, id_ in enumerate(predictions["id"].to_pylist())}
            rows = [pred_index.get(i) for i in es.ids[test]]
            have = np.array([r is not None for r in rows])
            width = predictions.schema.field("probs").type.list_size
            if width != len(classes):
                raise ValueError(f"the predictions are of {width} classes but the heads trained since know "
                                 f"{len(classes)}: run `clipfuse predict` again, then evaluate.")
            P = predictions["probs"].combine_chunks().flatten().to_numpy().reshape(-1, len(classes))
            y_test, P_test = es.test_labels[test][have], P[[r for r in rows if r is not None]]
            test_scores, n_test = score_predictions(y_test, P_test), len(y_test)
            report["test"] = test_scores
            files.append(plot_confusion(y_test, P_test.argmax(1), classes, out / "confusion_test.png"))
        metrics = out / "metrics.json"
        write_text_atomic(metrics, json.dumps(_finite(report), indent=2, allow_nan=False))
        return EvaluateResult(version="+".join(v.fingerprint for v in used), out=out, classes=classes,
                              validation=scores, weights=dict(ensemble.weights_), n_val=len(y_val),
                              val_counts=[int(np.sum(y_val == i)) for i in range(len(classes))], test=test_scores,
                              n_test=n_test, files=[metrics, *files], confusions=confusions,
                              versions=[v.fingerprint for v in used] if len(used) > 1 else [],
                              calibration=calibration, fusion=fusion, priors=priors, notices=notices)

    @staticmethod
    def _priors_report(ensemble, classes: list[str]) -> dict:
        """The labels' class proportions beside the pool's estimated ones, and how far apart they are."""
        from clipfuse.classify.priors import total_variation

        labels, pool = getattr(ensemble, "label_priors_", None), getattr(ensemble, "pool_priors_", None)
        if labels is None or pool is None:
            return {}
        return {"labels": dict(zip(classes, map(float, labels))), "pool": dict(zip(classes, map(float, pool))),
                "total_variation": total_variation(labels, pool), "applied": ensemble.prior_shift() is not None}

    def _confusions(self, trained, y_val, val_pred, X_labeled, y_labeled, top: int) -> list[dict]:
        """The most-confused class pairs on validation, with class names and example image paths."""
        import numpy as np

        from clipfuse.classify import confused_pairs

        classes = trained.classes
        pairs = confused_pairs(y_val, val_pred, classes, X=X_labeled,
                               labels=np.where(y_labeled < len(classes), y_labeled, -1), top=top)
        val_ids = trained.fit_ids[trained.ensemble.val_idx_]  # the rows as they were at train-heads time
        wanted = sorted({str(val_ids[i]) for p in pairs for i in p["examples"]})
        paths = {}
        if wanted:
            images = self.store.images(wanted).select(["id", "path"]).to_pydict()
            paths = dict(zip(images["id"], images["path"]))
        for p in pairs:
            p["examples"] = [paths.get(str(val_ids[i]), f"id:{val_ids[i]}") for i in p["examples"]]
        return pairs

    @staticmethod
    def _write_confusions(path: Path, pairs: list[dict]) -> Path:
        import polars as pl

        from clipfuse.data import write_frame_csv

        frame = pl.DataFrame({
            "class_a": [p["class_a"] for p in pairs], "class_b": [p["class_b"] for p in pairs],
            "a_as_b": [p["a_as_b"] for p in pairs], "b_as_a": [p["b_as_a"] for p in pairs],
            "errors": [p["errors"] for p in pairs], "rate": [p["rate"] for p in pairs],
            "similarity": [p["similarity"] for p in pairs],
            "examples": [" | ".join(p["examples"]) for p in pairs],
        }, schema={"class_a": pl.Utf8, "class_b": pl.Utf8, "a_as_b": pl.Int64, "b_as_a": pl.Int64,
                   "errors": pl.Int64, "rate": pl.Float64, "similarity": pl.Float64, "examples": pl.Utf8})
        write_frame_csv(path, frame)
        return path

    def export(self, path, *, version: str | None = None, versions=None, split: str = "unlabeled",
               probs: bool = False, force: bool = False, raw_cells: bool = False,
               format: str = "clipfuse", min_confidence: float | None = None, abstain_label: str = "unknown",
               target_precision: float | None = None, ood_threshold: float | None = None,
               ood_fraction: float | None = None) -> ExportResult:
        """Write the predictions of one split as a CSV, one row per image file, in path order.

        ``versions`` exports the predictions of the ensemble over those versions.

        ``format="clipfuse"``: ``path, id, label, confidence, ood`` (+ ``p_<class>`` with
        ``probs``; ``ood`` is empty for predictions made before clipfuse scored it).
        ``format="kaggle"``: ``id,label`` with id = the file name without its extension.
        Text cells a spreadsheet would run as a formula get a leading ``'`` unless ``raw_cells``.

        Abstention: images whose (calibrated) confidence is below ``min_confidence`` get
        ``abstain_label`` instead of a class; ``target_precision`` picks that threshold from the
        validation labels: the lowest one at which the kept validation images are still right at
        least that often. ``ood_threshold`` gives it to images whose OOD score is above it,
        ``ood_fraction`` to that share of the exported images with the highest OOD scores (one
        of the two); an image abstains when either the confidence or the OOD rule says so.
        """
        import numpy as np
        import polars as pl

        from clipfuse.data import is_stream, write_frame_csv

        notices = self._start()
        path = Path(path)
        if split not in EXPORT_SPLITS:
            raise OptionError("--split", f"split must be unlabeled, test or all; got {split!r}.")
        if format not in EXPORT_FORMATS:
            raise OptionError("--format", f"format must be clipfuse or kaggle; got {format!r}.")
        if format == "kaggle" and probs:
            raise OptionError("--probs", "the kaggle format has two columns (id,label); drop --probs or use "
                                         "--format clipfuse.")
        try:
            stream = is_stream(path)  # /dev/stdout or a FIFO: written into
        except OSError as e:
            raise OptionError("PATH", str(e)) from e
        if path.is_dir():
            raise OptionError("PATH", f"{str(path)!r} is a folder; give a CSV file name, e.g. predictions.csv.")
        if os.path.lexists(path) and not force and not stream:
            raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it or choose another file.")
        if min_confidence is not None and target_precision is not None:
            raise OptionError("--target-precision", "picks the threshold itself; give it or --min-confidence, not both.")
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:  # NaN fails this too
            raise OptionError("--min-confidence", f"must be a number between 0 and 1, got {min_confidence}.")
        if target_precision is not None and not 0.0 < target_precision <= 1.0:
            raise OptionError("--target-precision", f"must be a number in (0, 1], got {target_precision}.")
        if ood_threshold is not None and ood_fraction is not None:
            raise OptionError("--ood-fraction", "picks the most out-of-distribution share itself; give it or "
                                                "--ood-threshold, not both.")
        if ood_threshold is not None and not 0.0 <= ood_threshold <= 1.0:  # NaN fails this too
            raise OptionError("--ood-threshold", f"must be a number between 0 and 1 (OOD scores lie in [0, 1]), got "
                                                 f"{ood_threshold}.")
        if ood_fraction is not None and not 0.0 <= ood_fraction <= 1.0:
            raise OptionError("--ood-fraction", f"must be a share between 0 and 1 of the exported images (e.g. 0.05), "
                                                f"got {ood_fraction}.")
        ood_option = "--ood-threshold" if ood_threshold is not None else "--ood-fraction" if ood_fraction is not None \
            else None
        abstaining = min_confidence is not None or target_precision is not None or ood_option is not None
        if abstain_label != "unknown" and not abstaining:
            raise OptionError("--abstain-label", "names what images below a threshold get: give --min-confidence P, "
                                                 "--target-precision X, --ood-threshold T or --ood-fraction F with it.")
        if abstaining:
            name = str(abstain_label)
            if not name.strip() or name != name.strip() or name.strip() in self.store.classes():
                raise OptionError("--abstain-label", f"{abstain_label!r} is empty, has surrounding spaces, or is one "
                                                     "of the classes; pick a name no class has, so abstentions can't "
                                                     "be mistaken for predictions.")
        several = crossversion.resolve_versions(self, versions, version=version)
        if several is not None and len(several) > 1:
            fps = [v.fingerprint for v in several]
            meta = crossversion.saved_meta(self.store, several)
            if meta is not None:
                crossversion.check_saved_versions(self.store, meta)  # a version made again: its predictions are stale
            predictions = self.store.predictions(fps[0], versions=fps)
            if predictions is None:
                names = ",".join(v.short for v in several)
                raise LookupError(f"no predictions of the ensemble over versions {names}; run `clipfuse predict "
                                  f"--versions {names}` first.")
        else:
            v = self.version(several[0].fingerprint if several else version)
            predictions = self.store.predictions(v.fingerprint)
            if predictions is None:
                raise LookupError(f"no predictions for version {v.short}; run `clipfuse predict` first.")
        width = predictions.schema.field("probs").type.list_size
        classes = self.store.classes()[:width]  # the classes the heads were trained on (classes only get appended)
        if target_precision is not None:
            self._check_fresh_predictions(several, version, width)
        has_ood = "ood" in predictions.column_names and predictions["ood"].null_count < predictions.num_rows
        if ood_option is not None and not has_ood:
            raise OptionError(ood_option, "these predictions have no OOD scores (they were made before clipfuse "
                                          "scored them); run `clipfuse predict` again, then export.")
        columns = ["id", "label", "confidence", "probs"] + (["ood"] if "ood" in predictions.column_names else [])
        pred = pl.from_arrow(predictions.select(columns))
        if "ood" not in pred.columns:  # an older table: no score
            pred = pred.with_columns(pl.lit(None, pl.Float32).alias("ood"))
        pred = pred.select(["id", "label", "confidence", "ood", "probs"])
        images = pl.from_arrow(self.store.images().select(["path", "id", "split"]))
        if split != "all":
            images = images.filter(pl.col("split") == split)
        df = images.join(pred, on="id", how="inner").sort("path")
        missing = images.height - df.height
        threshold = chosen = None
        if target_precision is not None:
            chosen = self._precision_threshold(several, version, target_precision)
            threshold = chosen[0]
        elif min_confidence is not None:
            threshold = min_confidence
        low = np.zeros(df.height, dtype=bool)
        if threshold is not None:
            low = (df["confidence"] < threshold).to_numpy()
        unusual, ood_cut = np.zeros(df.height, dtype=bool), ood_threshold
        if ood_threshold is not None:
            unusual = (df["ood"].fill_null(-1.0) > ood_threshold).to_numpy()  # no score: the OOD rule can't say
        elif ood_fraction is not None:
            unusual, ood_cut = self._most_unusual(df["ood"], ood_fraction)
        abstained_confidence, abstained_ood, abstained = int(low.sum()), int(unusual.sum()), int((low | unusual).sum())
        if threshold is not None or ood_option is not None:
            df = df.with_columns(pl.when(pl.Series(low | unusual)).then(pl.lit(abstain_label))
                                 .otherwise(pl.col("label")).alias("label"))
        if format == "kaggle":
            df = self._kaggle_frame(df)
            if not raw_cells:
                from clipfuse.data import neutralise_cell

                changed = sum(neutralise_cell(v) != v for col in df.columns for v in df[col].to_list())
                if changed:
                    self._warn(f"{changed} id or label cell(s) start with = + - @ or a tab and were written with a "
                               "leading ' so that a spreadsheet can't run them; a submission must hold them exactly: "
                               "export again with --raw-cells.")
        elif probs:
            df = df.with_columns(pl.col("probs").arr.to_struct(fields=[f"p_{c}" for c in classes])).unnest("probs")
            df = df.drop("split")
        else:
            df = df.drop(["probs", "split"])
        write_frame_csv(path, df, raw=raw_cells)  # a unique temporary file, renamed over the target (never through it)
        if missing:
            self._warn(f"{missing} image(s) have no prediction yet: run `clipfuse predict` again")
        return ExportResult(path=path, rows=df.height, split=split, format=format, missing=missing, streamed=stream,
                            threshold=threshold, abstained=abstained,
                            threshold_coverage=None if chosen is None else chosen[1],
                            threshold_precision=None if chosen is None else chosen[2],
                            abstained_confidence=abstained_confidence, ood_threshold=ood_cut, ood_fraction=ood_fraction,
                            abstained_ood=abstained_ood, notices=notices)

    @staticmethod
    def _most_unusual(ood, fraction: float):
        """``(mask, cut)``: the ``round(fraction * rows)`` rows with the highest OOD score (ties in row
        order, rows without a score never) and the lowest score among them (None when none is)."""
        import math

        import numpy as np

        ood = ood.cast(float).fill_null(float("nan")).to_numpy()
        scored = np.flatnonzero(~np.isnan(ood))
        count = min(int(math.floor(fraction * len(ood) + 0.5)), len(scored))
        picked = scored[np.argsort(-ood[scored], kind="stable")[:count]]
        mask = np.zeros(len(ood), dtype=bool)
        mask[picked] = True
        return mask, (float(ood[picked].min()) if count else None)

    def _precision_threshold(self, several, version, target: float) -> tuple[float, float, float]:
        """(threshold, coverage, precision) on the saved validation predictions of the heads being exported."""
        from safetensors.numpy import load_file

        from clipfuse.classify.metrics import risk_coverage, threshold_for_precision

        from .heads import current_heads

        if several is not None and len(several) > 1:
            folder = crossversion.ensemble_folder(self.store, several).current()
        else:
            folder = current_heads(self.store, self.version(several[0].fingerprint if several else version))
        if folder is None or not (folder / "ensemble.safetensors").exists():
            raise FileNotFoundError("no trained heads to take the validation predictions from; run `clipfuse "
                                    "train-heads` first (or give --min-confidence).")
        arrays = load_file(str(folder / "ensemble.safetensors"))
        P, y = arrays["_val.fused"], arrays["_val_labels"]
        chosen = threshold_for_precision(P, y, target)
        if chosen is None:
            best = float(risk_coverage(P, y)["accuracy"].max()) if len(y) else float("nan")
            raise ValueError(f"no confidence threshold reaches precision {target:g} on the {len(y)} validation labels "
                             f"(the best is {best:.3f}, keeping only the most confident); lower --target-precision, "
                             "or label more images.")
        kept = int(round(chosen[1] * len(y)))
        if len(y) < 50 or kept < 20:
            self._warn(f"the threshold comes from {len(y)} validation labels, {kept} of them above it: the precision "
                       "it promises is rough")
        return chosen

    def _check_fresh_predictions(self, several, version, width: int) -> None:
        """Refuse predictions made by other heads than the saved ones (train-heads ran again, predict did not)."""
        from .heads import current_heads

        if several is not None and len(several) > 1:
            folder = crossversion.ensemble_folder(self.store, several).current()
        else:
            folder = current_heads(self.store, self.version(several[0].fingerprint if several else version))
        if folder is None or not (folder / _heads.ENSEMBLE_FILE).exists():
            return
        trained = json.loads((folder / _heads.ENSEMBLE_FILE).read_text()).get("n_classes")
        if trained and trained != width:
            raise ValueError(f"the predictions are of {width} classes but the heads trained since know {trained}: "
                             "run `clipfuse predict` again, then export.")

    @staticmethod
    def _kaggle_frame(df):
        """``id,label``: the file name without extension, as competition submissions name images
        (rows imported without a file, whose path is ``id:<id>``, keep their id)."""
        import polars as pl

        def kaggle_id(path: str) -> str:
            return path[3:] if path.startswith("id:") else Path(path).stem

        out = df.select(pl.col("path").map_elements(kaggle_id, return_dtype=pl.Utf8).alias("id"), pl.col("label"))
        repeated = out.filter(pl.col("id").is_duplicated())
        if repeated.height:
            first = repeated["id"][0]
            paths = [p for p in df["path"].to_list() if kaggle_id(p) == first]
            raise ValueError(f"{repeated['id'].n_unique()} file name(s) occur more than once without their "
                             f"extension (e.g. {first!r}: {', '.join(paths[:3])}), so the kaggle format's id "
                             "would be ambiguous; rename the files, or export --format clipfuse (full paths).")
        return out

    def demo(self, workdir="clipfuse-demo", **kwargs):
        """The whole job on sklearn's digits; see :func:`clipfuse.workspace.demo.run_demo`."""
        from .demo import run_demo

        return run_demo(workdir, on_notice=self.on_notice, **kwargs)


def open(db: str | os.PathLike = "clipfuse.lance", **kwargs) -> Workspace:  # clipfuse.open, like lancedb.connect
    """Open the store at ``db`` (created on the first ``index``) as a :class:`Workspace`.

    >>> import clipfuse
    >>> ws = clipfuse.open("clipfuse.lance")  # doctest: +SKIP
    >>> ws.index("data/train", unlabeled="data/pool")  # doctest: +SKIP
    """
    return Workspace(db, **kwargs)
