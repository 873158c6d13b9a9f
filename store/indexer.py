"""The index run: embed each new image once and commit it to the store in batches."""

from __future__ import annotations

import contextvars
import functools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from clipfuse.data import printable_path

from .store import Store
from .versions import EmbeddingVersion


@dataclass(frozen=True)
class IndexConfig:
    """How an index run commits its work."""

    commit_every: int = 512  # images per LanceDB commit; a crash loses at most this much work
    optimize: bool = True  # compact the tables at the end of the run
    build_ann: bool = True  # bring the hnswlib index up to date when the version is large enough to use it


@dataclass
class IndexSummary:
    """What an index run did."""

    found: int = 0  # image files given
    embedded: int = 0  # new vectors computed
    unchanged: int = 0  # skipped: same path, size and mtime, vector present
    duplicates: int = 0  # content already embedded under another path (or earlier in the run)
    relabeled: int = 0  # unchanged files whose split or label changed
    removed: int = 0  # rows of files no longer found under the scanned folders
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason); paths shown as in printable_path
    repaired: dict[str, int] = field(default_factory=dict)  # duplicate rows removed first (written before the lock)
    previous_active: EmbeddingVersion | None = None  # the version that was active before, when this run made another one active
    seconds: float = 0.0
    fingerprint: str = ""

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0


def _stat(f) -> tuple[int, float] | None:
    """Size and mtime of an image file: listed for objects on object storage, stat'ed for local files."""
    if f.size is not None:
        return f.size, f.mtime
    try:
        st = os.stat(f.path)
    except OSError:
        return None
    return st.st_size, st.st_mtime


@dataclass
class _Pending:
    """What one commit writes; filled batch by batch until ``commit_every`` is reached."""

    ids: list[str] = field(default_factory=list)  # ids of the new vectors
    vectors: list[np.ndarray] = field(default_factory=list)  # their (n, dim) blocks
    image_rows: list[dict] = field(default_factory=list)
    error_rows: list[dict] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)  # paths whose earlier error is fixed
    dropped: list[str] = field(default_factory=list)  # paths whose file became unreadable

    def __len__(self) -> int:
        return len(self.image_rows) + len(self.error_rows)


class _Writer:
    """Commits batches on one background thread, in order, so writes overlap the model."""

    def __init__(self, store: Store, fingerprint: str, dim: int, *, add_vectors: Callable | None = None):
        self.store, self.fingerprint, self.dim = store, fingerprint, dim
        self.add_vectors = add_vectors or store.add_embeddings  # (fingerprint, ids, vectors): one commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipfuse-writer")
        self._pending: Future | None = None

    def submit(self, pending: _Pending) -> None:
        self.wait()
        # with the caller's context, so the commit thread writes under the run's writer lock
        self._pending = self._pool.submit(contextvars.copy_context().run, self._commit, pending)

    def _commit(self, p: _Pending) -> None:
        vectors = np.concatenate(p.vectors) if p.vectors else np.zeros((0, self.dim), dtype=np.float32)
        # Vectors first: an image row must never point at a vector that is not there yet.
        self.add_vectors(self.fingerprint, p.ids, vectors)
        self.store.upsert_images(p.image_rows)
        self.store.record_errors(p.error_rows)
        self.store.delete_images(p.dropped)  # files that became unreadable lose their old row
        self.store.clear_errors(p.cleared)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def index_images(store: Store, embedder, files, classes: list[str], *, roots: list[str] | None = None,
                 config: IndexConfig | None = None,
                 progress: Callable[[int, int], None] | None = None, ray=None) -> IndexSummary:
    """Embed every new or changed image of ``files`` into the store.

    Parameters
    ----------
    store : Store
    embedder : clipfuse.embed.Embedder
        Model whose fingerprint names the embedding version written to.
    files : list of clipfuse.data.ImageFile
    classes : list of str
        Class names of the labeled files, added to the store's class list.
    roots : list of str, optional
        Absolute folders (or folder URIs) that ``files`` were found under. Rows of files under
        these folders that are no longer among ``files`` (moved or deleted) are removed at the
        end of the run; rows under other folders are never touched.
    config : IndexConfig, optional
    progress : callable(done, total), optional
        Called after each batch with the number of files handled so far.
    ray : clipfuse.store.RayConfig, optional
        Embed on a Ray cluster (see :mod:`clipfuse.store.rayindex`) instead of in this process.
        Everything else (what is skipped, the shard commits, error rows, resume) is the same.

    Returns
    -------
    IndexSummary

    Notes
    -----
    Safe to kill at any point: vectors are committed before the image rows that point
    at them, vectors are inserted only for ids not yet present, and image rows are
    upserted by path. Re-running finishes the work without duplicates.

    The run holds the store's writer lock from start to end: a second writer waits
    (``store.on_lock_wait`` is told who holds it). Duplicate rows left by writers that ran
    at once before the lock existed are removed first (``summary.repaired``).
    """
    with store.writer("clipfuse index" + (" --ray" if ray is not None else "")):
        return _index_locked(store, embedder, files, classes, roots=roots, config=config or IndexConfig(),
                             progress=progress, ray=ray)


class _Run:
    """The bookkeeping of one index run: what the store holds, and the rows each record adds."""

    def __init__(self, store: Store, fp: str, files, summary: IndexSummary):
        self.store, self.fp, self.summary = store, fp, summary
        self.known = {r["path"]: r for r in store.images().to_pylist()}
        self.embedded = store.embedded_ids(fp)
        self.previous_errors = set(store.errors()["path"].to_pylist())
        self.now = time.time()
        self.todo, relabel_rows = [], []
        for f in files:
            row, st = self.known.get(f.path), _stat(f)
            if row is not None and st is not None and (row["bytes"], row["mtime"]) == st and row["id"] in self.embedded:
                if (row["split"], row["label"]) == (f.split, f.label):
                    summary.unchanged += 1
                else:
                    relabel_rows.append({**row, "split": f.split, "label": f.label, "indexed_at": self.now})
            else:
                self.todo.append(f)
        summary.relabeled = len(relabel_rows)
        store.upsert_images(relabel_rows)
        self.by_path = {f.path: f for f in self.todo}
        # Errors of files that are fine now and need no reading (e.g. a run killed before it cleared them).
        store.clear_errors([f.path for f in files if f.path in self.previous_errors and f.path not in self.by_path])
        self.found = {printable_path(f.path) for f in files}
        self.seen = set(self.embedded)

    def is_new(self, record) -> bool:
        return record.error is None and record.id not in self.seen

    def add(self, pending: _Pending, rec, vector: np.ndarray | None) -> None:
        """Book one read file into ``pending``: its vector (when its content is new), its image or error row."""
        f = self.by_path[rec.path]
        if f.size is not None:  # on object storage: the listed size and time, which the next run compares with
            rec.bytes, rec.mtime = f.size, f.mtime
        summary = self.summary
        if rec.error is None:
            if rec.id in self.seen:
                summary.duplicates += 1
            elif vector is None:
                raise RuntimeError(f"{printable_path(rec.path)} was read but not embedded; this is a bug in clipfuse.")
            else:
                self.seen.add(rec.id)
                pending.vectors.append(vector.reshape(1, -1))
                pending.ids.append(rec.id)
                summary.embedded += 1
        if rec.error is not None:
            shown = printable_path(rec.path)  # a name that isn't UTF-8 is recorded with its bytes escaped
            summary.errors.append((shown, rec.error))
            pending.error_rows.append({"path": shown, "reason": rec.error, "bytes": rec.bytes,
                                       "mtime": rec.mtime, "at": self.now})
            if rec.path in self.known:
                pending.dropped.append(rec.path)
            return
        pending.image_rows.append({"id": rec.id, "path": rec.path, "split": f.split, "label": f.label,
                                   "width": rec.width, "height": rec.height, "bytes": rec.bytes,
                                   "mtime": rec.mtime, "indexed_at": self.now})
        if rec.path in self.previous_errors:
            pending.cleared.append(rec.path)

    def finish(self, roots) -> None:
        if roots:
            # Last, so a killed run never loses a row it still needs: moved or deleted files.
            prefixes = tuple(r.rstrip("/") + "/" for r in roots)
            gone = [p for p in self.known if p.startswith(prefixes) and p not in self.found]
            stale_errors = [p for p in self.previous_errors if p.startswith(prefixes) and p not in self.found]
            self.store.delete_images(gone)
            self.store.clear_errors(stale_errors)
            self.summary.removed = len(gone)


def _local_batches(embedder, run: _Run, paths: list[str], storage_options):
    """(records, vectors by record position) per batch, embedded in this process."""
    for batch in embedder.iter_batches(paths, storage_options=storage_options):
        forward, fresh = [], set()  # positions in batch.ok of the images whose content is new
        for j, r in enumerate(batch.ok):
            rec = batch.records[r]
            if run.is_new(rec) and rec.id not in fresh:
                fresh.add(rec.id)
                forward.append(j)
        vectors = embedder.encode_pixels(batch.pixels[forward]) if forward else None
        yield batch.records, {batch.ok[j]: vectors[k] for k, j in enumerate(forward)}


def _index_locked(store: Store, embedder, files, classes, *, roots, config, progress, ray) -> IndexSummary:
    started = time.perf_counter()
    info = embedder.info
    fp = info.fingerprint
    summary = IndexSummary(found=len(files), fingerprint=fp)
    summary.repaired = {k: v for k, v in store.repair().items() if v}
    try:
        before = store.get_version()
    except LookupError:
        before = None
    store.register_version(info.to_dict())
    store.add_classes(classes)
    run = _Run(store, fp, files, summary)
    paths = [f.path for f in run.todo]
    if ray is None:
        batches, add_vectors = _local_batches(embedder, run, paths, store.folder_storage_options), None
    else:
        from .rayindex import ray_batches, write_args

        batches = ray_batches(embedder, paths, skip=run.embedded, config=ray,
                              storage_options=store.folder_storage_options)
        add_vectors = functools.partial(store.append_embeddings, ray_remote_args=write_args(store))

    writer = _Writer(store, fp, info.dim, add_vectors=add_vectors)
    pending = _Pending()
    done = summary.found - len(run.todo)
    if progress:
        progress(done, summary.found)
    try:
        for records, vectors in batches:
            for i, rec in enumerate(records):
                run.add(pending, rec, vectors.get(i))
                if len(pending) >= config.commit_every:  # a shard: one commit of its vectors
                    writer.submit(pending)
                    pending = _Pending()
            done += len(records)
            if progress:
                progress(done, summary.found)
        writer.submit(pending)
    finally:
        try:
            writer.close()  # the last shard's commit (on Ray: a write job) finishes first
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops a Ray job (and the Ray instance it started) even when the loop failed
    run.finish(roots)
    store.activate(fp)
    if before is not None and before.fingerprint != fp:
        summary.previous_active = before
    if config.optimize:
        store.optimize()
    if config.build_ann and store.get_version(fp).rows >= store.ann_threshold:
        store.ann_index(fp)
    summary.seconds = time.perf_counter() - started
    return summary
