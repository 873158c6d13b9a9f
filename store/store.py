"""The LanceDB store: images, embedding versions, index errors; the only module that talks to LanceDB."""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipfuse.data import SPLIT_PRIORITY

from .ann import AnnConfig, AnnIndex
from .lock import WriterLock
from .versions import EmbeddingVersion

DEFAULT_DB = "clipfuse.lance"
IMAGES, ERRORS, VERSIONS, CLASSES = "images", "index_errors", "embedding_versions", "classes"
LABELS = "labels"
LABEL_SOURCES = ("human", "import")  # of rows of the labels table; folder labels live in the images table

IMAGES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # content hash of the file
    pa.field("path", pa.string(), nullable=False),  # absolute path; one row per path
    pa.field("split", pa.string(), nullable=False),  # labeled / unlabeled / test
    pa.field("label", pa.string()),  # class name, null when unknown
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("mtime", pa.float64()),
    pa.field("indexed_at", pa.float64()),
])
ERRORS_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("bytes", pa.int64()),
    pa.field("mtime", pa.float64()),
    pa.field("at", pa.float64()),
])
VERSIONS_SCHEMA = pa.schema([
    pa.field("fingerprint", pa.string(), nullable=False),
    pa.field("table", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("pretrained", pa.string()),
    pa.field("weights_hash", pa.string()),
    pa.field("preprocess", pa.string()),
    pa.field("dim", pa.int32(), nullable=False),
    pa.field("random_weights", pa.bool_()),
    pa.field("source", pa.string()),  # 'index' or 'import:<what>'
    pa.field("created_at", pa.float64()),
    pa.field("activated_at", pa.float64()),  # set when a complete run makes it the active version
    pa.field("precision", pa.string()),  # 'fp32' or 'int8'; null in stores made before it was recorded: fp32
    pa.field("decode", pa.string()),  # 'full' or 'draft'; null in stores made before it was recorded: full
])
_VERSION_COLUMNS_ADDED = ("precision", "decode")  # columns later than the first VERSIONS_SCHEMA
LABELS_SCHEMA = pa.schema([  # every label change, kept: the last row of an id is its label
    pa.field("id", pa.string(), nullable=False),  # image content id
    pa.field("label", pa.string()),  # class name; null: "no label" (the image is not trained on)
    pa.field("source", pa.string(), nullable=False),  # one of LABEL_SOURCES
    pa.field("given", pa.string()),  # what the user named the image by (its path or id)
    pa.field("at", pa.float64(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),  # order of the rows of one commit
])
CLASSES_SCHEMA = pa.schema([
    pa.field("index", pa.int32(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
])


def _embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
    ])


def _sql_list(values) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def _read_columns(table, columns: list[str]) -> pa.Table:
    """Read whole columns of a table (a plain scan, no row limit)."""
    return table.search().select(columns).limit(None).to_arrow()


def _first_rows(keys: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """Row positions that keep the first row of each key, in order; None when every key is unique."""
    if pc.count_distinct(keys).as_py() == len(keys):
        return None
    _, first = np.unique(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object).astype(str), return_index=True)
    return np.sort(first)


def _last_by(table: pa.Table, key: str, order: str) -> pa.Table:
    """One row per ``key``: the one with the largest ``order`` (the later one on a tie)."""
    if pc.count_distinct(table[key]).as_py() == table.num_rows:
        return table
    import polars as pl

    df = pl.from_arrow(table).with_row_index("_row")
    df = df.sort([order, "_row"], nulls_last=False).unique(key, keep="last", maintain_order=True)
    return df.sort("_row").drop("_row").to_arrow().cast(table.schema)


def _remove_path(path: Path) -> None:
    """Remove a file, a symlink (not what it points to) or a folder tree; absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


# Table names per store (its lock key), listed once per hold of the writer lock: while the lock is held
# nobody else can add a table, every Store object of this process that creates one clears the entry,
# and taking the lock afresh clears it too (other writers may have added tables in between).
_TABLE_NAMES: dict[str, frozenset[str]] = {}

_LANCE_LOCATION = re.compile(r",?\s*/\S*\.rs:\d+:\d+\s*$")


def resolve_storage_options(uri: str, given: dict[str, str] | None) -> dict[str, str]:
    """LanceDB storage options of a store on object storage: ``given`` (``--storage-option``)
    over what the cloud's standard variables say; an ``http://`` endpoint (a local S3 API)
    allows plain http unless told otherwise."""
    opts = {str(k).lower(): str(v) for k, v in (given or {}).items()}
    if uri.startswith("s3://"):
        endpoint = opts.get("endpoint") or opts.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            # under both names: LanceDB takes AWS_ENDPOINT_URL over a given "endpoint", but not over "aws_endpoint"
            opts["endpoint"] = opts["aws_endpoint"] = endpoint
        if endpoint and endpoint.startswith("http://"):
            opts.setdefault("allow_http", "true")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region and "region" not in opts and "aws_region" not in opts:
            opts["region"] = region
    return opts


def with_env_credentials(options: dict[str, str] | None) -> dict[str, str]:
    """``options`` plus this process's AWS keys (when set and not given): for writes and reads that Ray
    workers make on the driver's behalf, which may not have the driver's environment."""
    opts = dict(options or {})
    for key, env in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                     ("aws_session_token", "AWS_SESSION_TOKEN")):
        if os.environ.get(env) and not opts.get(key) and not opts.get(key.removeprefix("aws_")):
            opts[key] = os.environ[env]
    if os.environ.get("AWS_ENDPOINT_URL") and not any(opts.get(k) for k in ("endpoint", "aws_endpoint")):
        opts["endpoint"] = os.environ["AWS_ENDPOINT_URL"]
        if opts["endpoint"].startswith("http://"):
            opts.setdefault("allow_http", "true")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and not any(opts.get(k) for k in ("region", "aws_region")):
        opts["region"] = region
    return opts


def _remote_message(uri: str, e: Exception) -> OSError | None:
    """A clear error for an object store's refusal inside a LanceDB error, or None if it is not one."""
    text = str(e)
    if "://" not in uri or "store:" not in text and "ObjectStore" not in text and "object_store" not in text:
        return None
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if "NoSuchBucket" in text:
        return FileNotFoundError(f"the bucket {bucket!r} of store {uri!r} does not exist; create it, or check the --db "
                                 "URI.")
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "status: 403"):
        if code in text:
            return PermissionError(f"store {uri!r}: the object store refused the credentials ({code}); check "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the --storage-option keys.")
    if "Connection refused" in text or "error sending request" in text or "dns error" in text:
        return ConnectionError(f"store {uri!r}: the object store can't be reached ({_LANCE_LOCATION.sub('', text)[:200]});"
                               " check the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint=...).")
    return OSError(f"store {uri!r}: the object store failed: {_LANCE_LOCATION.sub('', text)[:300]}")


def _storage_message(uri: str, e: Exception) -> str:
    """A one-line message for an error that LanceDB raised while reading or writing the store."""
    text = _LANCE_LOCATION.sub("", str(e).strip()).removeprefix("lance error: ")
    text = re.sub(r"^LanceError\((\w+)\):\s*", "", text)
    low = text.lower()
    if "permission denied" in low or "operation not permitted" in low or "read-only file system" in low:
        hint = "the store is not writable here; use a writable --db, or copy the store"
    elif "conflict" in low:
        hint = "another program changed the store at the same moment; run the command again"
    elif "no space" in low:
        hint = "the disk is full; free some space and run the command again (nothing was half-written)"
    else:
        hint = "the store may be damaged or written by a newer clipfuse; `clipfuse info` shows what it holds"
    return f"store {uri!r}: {text} ({hint})."


def _storage_errors(method):
    """Turn LanceDB's RuntimeErrors into OSErrors with a one-line message naming the store."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as e:
            if "lance" not in str(e).lower() and "commit" not in str(e).lower():
                raise
            raise OSError(_storage_message(self.uri, e)) from e
        except ValueError as e:  # LanceDB reports object-store failures (no bucket, refused keys) as ValueError
            remote = _remote_message(self.uri, e)
            if remote is None:
                raise
            raise remote from e

    return wrapper


def _checked_vectors(version, ids: list[str], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as contiguous float32, refused unless they fit the version and ``ids`` and are finite."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != version.dim:
        raise ValueError(f"version {version.fingerprint} holds {version.dim}-d vectors, "
                         f"got an array of shape {vectors.shape}.")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors.")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{int((~np.isfinite(vectors).all(axis=1)).sum())} vectors for version "
                         f"{version.fingerprint} hold NaN or infinite values; the model that made them is "
                         "broken (check its weights). Nothing of them was written.")
    return vectors


@dataclass
class EmbeddingSet:
    """The interchange format of the later stages: one row per unique image id.

    ``labels[i]`` is the class index of row i in ``classes`` for labeled images and -1
    otherwise; ``test_labels`` holds the known labels of test images (-1 elsewhere), kept
    apart so that no head trains on them.
    """

    ids: np.ndarray  # (n,) str
    X: np.ndarray  # (n, dim) float32, unit rows
    labels: np.ndarray  # (n,) int64, -1 = unlabeled
    splits: np.ndarray  # (n,) str
    test_labels: np.ndarray  # (n,) int64
    classes: list[str]
    fingerprint: str
    conflicts: list[str] = field(default_factory=list)  # ids labeled with two different classes


class Store:
    """An embedded LanceDB database holding images, their embeddings and index errors.

    Parameters
    ----------
    uri : str or path, default "clipfuse.lance"
        A folder (created on first write) or ``memory://`` for tests.
    ann_threshold : int, default 50_000
        Embedding versions with at least this many rows answer neighbour queries with an
        hnswlib index saved beside the tables; smaller ones use exact search.
    lock_timeout : float, optional
        Seconds a write waits for another writer of the store; None waits as long as it takes.
    on_lock_wait : callable(str), optional
        Called once with a description of the other writer when a write has to wait.

    Notes
    -----
    One writer at a time: every method that changes the store holds the store's writer
    lock (:meth:`writer`), a file lock the operating system drops when its holder exits
    or is killed. Readers never take it and never wait.
    """

    def __init__(self, uri: str | Path = DEFAULT_DB, *, ann_threshold: int = 50_000, ann_config: AnnConfig | None = None,
                 lock_timeout: float | None = None, on_lock_wait: Callable[[str], None] | None = None,
                 storage_options: dict[str, str] | None = None):
        self.uri = str(uri)
        if self.uri.startswith("file://"):  # the same folder under the same lock as its plain path
            from urllib.parse import unquote, urlparse

            parsed = urlparse(self.uri)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"store URI {self.uri!r} names the host {parsed.netloc!r}; use file:///absolute/path.")
            self.uri = unquote(parsed.path)
        self.is_local = "://" not in self.uri
        if self.is_local and Path(self.uri).is_file():
            raise NotADirectoryError(f"--db {self.uri!r} is a file; a store is a folder (e.g. clipfuse.lance).")
        self.ann_threshold = ann_threshold
        self.ann_config = ann_config or AnnConfig()
        self.lock_timeout = lock_timeout
        self.on_lock_wait = on_lock_wait
        self._db = None
        self._ann: dict[str, AnnIndex] = {}
        self.storage_options = resolve_storage_options(self.uri, storage_options)
        # for image folders on object storage (s3://bucket/train): the options as given, over the AWS_* variables
        self.folder_storage_options = {str(k).lower(): str(v) for k, v in (storage_options or {}).items()}
        folder = Path(self.uri).absolute() if self.is_local else None
        remote = None
        if self.uri.startswith("s3://"):
            from .objectlock import S3Lease

            def remote():
                return S3Lease(self.uri, self.storage_options)
        elif not self.is_local and not self.uri.startswith("memory://"):
            def remote():
                scheme = self.uri.split("://", 1)[0]
                raise OSError(f"store {self.uri!r}: writing to {scheme}:// is not supported yet, because clipfuse "
                              "has no writer lock there to keep two writers apart (reading works); use s3:// or a "
                              "folder.")
        self._lock = WriterLock(folder, str(folder.resolve()) if folder else self.uri, remote=remote)

    @property
    def db(self):
        """The LanceDB connection, opened on first use (connecting creates the folder)."""
        if self._db is None:
            self._db = lancedb.connect(self.uri, storage_options=self.storage_options or None)
        return self._db

    def writer(self, what: str = "a clipfuse writer"):
        """Context manager holding the store's writer lock (re-entrant: inside it, and in threads
        started with its context, further ``writer()`` blocks pass straight through).

        Commands that read, then write, hold it for their whole run; each write method
        takes it by itself too, so nothing writes unlocked. Raises PermissionError at once
        on a store that is not writable.
        """
        return self._hold(what)

    @contextlib.contextmanager
    def _hold(self, what: str):
        outermost = not self._lock.held
        with self._lock.hold(what, timeout=self.lock_timeout, on_wait=self.on_lock_wait):
            if outermost:
                _TABLE_NAMES.pop(self._lock.key, None)
            try:
                yield
            finally:
                if outermost:
                    _TABLE_NAMES.pop(self._lock.key, None)

    @property
    def exists(self) -> bool:
        """Whether the store has been written to (its folder exists; always True off disk)."""
        return not self.is_local or Path(self.uri).is_dir()

    # ---- tables -------------------------------------------------------------------------
    def _table_names(self) -> set[str]:
        """The store's tables; listed once while this process holds the writer lock (see
        ``_TABLE_NAMES``), listed afresh by every call of a reader."""
        held = self._lock.held
        if held and self._lock.key in _TABLE_NAMES:
            return set(_TABLE_NAMES[self._lock.key])
        if not self.exists:
            return set()
        names, token = set(), None
        while True:
            try:
                page = self.db.list_tables(page_token=token)
            except ValueError as e:  # an object store's refusal (no bucket, wrong keys), said clearly
                remote = _remote_message(self.uri, e)
                if remote is None:
                    raise
                raise remote from e
            names.update(page.tables)
            token = page.page_token
            if not token:
                break
        if held:
            _TABLE_NAMES[self._lock.key] = frozenset(names)
        return names

    def _create_table(self, name: str, data=None, **kwargs):
        _TABLE_NAMES.pop(self._lock.key, None)
        return self.db.create_table(name, data, **kwargs)

    def _table(self, name: str, schema: pa.Schema | None = None):
        if name in self._table_names():
            return self.db.open_table(name)
        if schema is None:
            return None
        with self.writer():
            return self._create_table(name, schema=schema, exist_ok=True)

    def _read(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        table = self._table(name)
        if table is None:
            return None
        return _read_columns(table, columns) if columns else table.to_arrow()

    @_storage_errors
    def table_versions(self, fingerprint: str | None = None) -> tuple:
        """The commit numbers of the images, labels and classes tables, the version's predictions table,
        and the versions and errors tables (None for a table not written yet): a key that changes
        whenever what a reader derived from them would."""
        names = [IMAGES, LABELS, CLASSES, self._predictions_table_name(fingerprint, None), VERSIONS, ERRORS]
        present = self._table_names()
        return tuple(self.db.open_table(n).version if n in present else None for n in names)

    @property
    def is_empty(self) -> bool:
        return VERSIONS not in self._table_names()

    # ---- classes ------------------------------------------------------------------------
    @_storage_errors
    def classes(self) -> list[str]:
        """Ordered class names; a class keeps its index for the life of the store.

        A name recorded twice (by two writers before the store had a writer lock)
        counts once, at its first place.
        """
        t = self._read(CLASSES)
        if t is None:
            return []
        order = np.argsort(t["index"].to_numpy(), kind="stable")
        return list(dict.fromkeys(t["name"][int(i)].as_py() for i in order))

    @_storage_errors
    def add_classes(self, names: list[str]) -> list[str]:
        """Append the names not yet known; return the full class list."""
        with self.writer():
            t = self._read(CLASSES, ["index"])
            known = self.classes()
            new = [n for n in dict.fromkeys(names) if n not in known]
            if new:
                start = int(pc.max(t["index"]).as_py()) + 1 if t is not None and t.num_rows else 0
                rows = pa.table({"index": pa.array(range(start, start + len(new)), pa.int32()),
                                 "name": pa.array(new, pa.string())}, schema=CLASSES_SCHEMA)
                self._table(CLASSES, CLASSES_SCHEMA).add(rows)
            return known + new

    # ---- embedding versions ---------------------------------------------------------------
    def _version_rows(self) -> list[EmbeddingVersion]:
        """The version records, one per fingerprint, oldest first (a fingerprint recorded
        twice keeps its first record and its latest activation); rows not counted."""
        t = self._read(VERSIONS)
        if t is None:
            return []
        unique: dict[str, dict] = {}
        for r in sorted(t.to_pylist(), key=lambda r: r["created_at"]):
            first = unique.setdefault(r["fingerprint"], r)
            if r["activated_at"] is not None and (first["activated_at"] or 0) < r["activated_at"]:
                first["activated_at"] = r["activated_at"]
        return [EmbeddingVersion.from_row(r) for r in unique.values()]

    def _versions_table(self):
        """The versions table for writing, with the columns added since a store was made (old rows: null)."""
        table = self._table(VERSIONS, VERSIONS_SCHEMA)
        missing = [VERSIONS_SCHEMA.field(n) for n in _VERSION_COLUMNS_ADDED if n not in table.schema.names]
        if missing:
            table.add_columns(missing)
        return table

    def _count_rows(self, version: EmbeddingVersion, names: set[str] | None = None) -> EmbeddingVersion:
        names = self._table_names() if names is None else names
        return version.with_rows(self.db.open_table(version.table).count_rows() if version.table in names else 0)

    @_storage_errors
    def versions(self) -> list[EmbeddingVersion]:
        """Every embedding version, oldest first, with its row count."""
        names = self._table_names()
        return [self._count_rows(v, names) for v in self._version_rows()]

    @_storage_errors
    def register_version(self, info: dict, *, source: str = "index") -> EmbeddingVersion:
        """Record the model behind an embedding version (idempotent) and create its table.

        ``info`` holds ``fingerprint, model, pretrained, weights_hash, preprocess, dim``
        and optionally ``random_weights``, as :class:`clipfuse.embed.ModelInfo` gives it.
        """
        with self.writer():
            return self._register_version(info, source)

    def _register_version(self, info: dict, source: str) -> EmbeddingVersion:
        fp = info["fingerprint"]
        for v in self._version_rows():
            if v.fingerprint == fp:
                if v.dim != info["dim"]:
                    raise ValueError(f"version {fp} is recorded with dim {v.dim}, got {info['dim']}.")
                self._table(v.table, _embeddings_schema(v.dim))  # a run killed between the two writes
                return self._count_rows(v)
        row = {
            "fingerprint": fp, "table": f"embeddings_{fp}", "model": info["model"],
            "pretrained": info.get("pretrained"), "weights_hash": info.get("weights_hash"),
            "preprocess": info.get("preprocess"), "dim": int(info["dim"]),
            "random_weights": bool(info.get("random_weights", False)), "source": source,
            "created_at": time.time(), "activated_at": None,
            "precision": info.get("precision") or "fp32", "decode": info.get("decode") or "full",
        }
        self._table(row["table"], _embeddings_schema(row["dim"]))
        self._versions_table().add(pa.Table.from_pylist([row], schema=VERSIONS_SCHEMA))
        return EmbeddingVersion.from_row(row, rows=0)

    @_storage_errors
    def activate(self, fingerprint: str) -> None:
        """Make a version the default of neighbour queries and later stages."""
        with self.writer():
            fp = self.get_version(fingerprint, count_rows=False).fingerprint
            self._table(VERSIONS).update(where=f"fingerprint = '{fp}'", values={"activated_at": time.time()})

    @_storage_errors
    def remove_version(self, fingerprint: str) -> EmbeddingVersion:
        """Remove an embedding version: its record, its vectors, predictions, neighbour index and heads.

        Parameters
        ----------
        fingerprint : str
            Version to remove (fingerprint or unique prefix). Unlike the readers, there is no
            default: removing whichever version happens to be active is never implied.

        Returns
        -------
        EmbeddingVersion
            The removed version, with the rows it held.

        Raises
        ------
        ValueError
            When ``fingerprint`` is None.
        LookupError
            When the store has no such version (or the prefix matches several); the message
            lists the ones it has.

        Notes
        -----
        The record goes first, in one commit: from then on the version does not exist for any
        reader, and a crash leaves only orphans (tables, files) that no version points to. If the
        version was the active one, the most recently activated remaining complete version becomes
        active (the active version is always derived from the records, never stored apart). On a
        remote store only the tables are dropped: the index and heads folders live beside local
        stores only.
        """
        if fingerprint is None:
            raise ValueError("name the version to remove (a fingerprint or unique prefix, as "
                             "`clipfuse info` lists them); the active version is not removed by default.")
        with self.writer(f"removing version {fingerprint}"):
            version = self.get_version(fingerprint)  # rows counted now, while they still exist
            fp = version.fingerprint
            # every row of the fingerprint (one recorded twice before the writer lock included)
            self._table(VERSIONS).delete(f"fingerprint = {_sql_list([fp])}")
            for name in (version.table, self._predictions_name(version)):
                self._drop_table(name)
            self._ann.pop(fp, None)
            if self.is_local:
                self._remove_version_files(fp)
            elif self.uri.startswith("s3://"):  # its heads objects and model copy, and this machine's cached index
                self.object_folder(f"_heads/{fp}").remove()
                self.object_folder(f"_models/{fp}").remove()
                folder = self._ann_folder()
                for path in folder.glob(f"{fp}.*") if folder is not None and folder.is_dir() else ():
                    _remove_path(path)
        return version

    def _drop_table(self, name: str) -> None:
        """Drop a table if the store has it, forgetting the listed names (as ``_create_table`` does)."""
        if name in self._table_names():
            _TABLE_NAMES.pop(self._lock.key, None)  # before: a failed drop may still have removed it
            self.db.drop_table(name, ignore_missing=True)
            _TABLE_NAMES.pop(self._lock.key, None)

    def _remove_version_files(self, fp: str) -> None:
        """Remove a version's files beside the tables (a removed version's record is already gone).

        Only names derived from the fingerprint are touched; fingerprints are hex digits, so
        ``<fp>.`` never starts another version's names.
        """
        ann = self._ann_folder()
        # AnnIndex.save writes these three, each through a temporary ``.<name>.*.tmp`` a crash may leave
        for suffix in (".hnsw", ".ids.npy", ".json"):
            _remove_path(ann / f"{fp}{suffix}")
            for tmp in ann.glob(f".{glob.escape(fp + suffix)}.*.tmp"):
                _remove_path(tmp)
        heads = Path(self.uri) / "_heads"
        # ``<fp>`` is a symlink to a generation ``<fp>.gen-*`` (clipfuse.data.publish_folder) or, written
        # before generations, a plain folder; ``<fp>.old``/``.old-*``/``.tmp`` and hidden ``.<fp>.*``
        # (staging, half-swapped links) are what crashes leave. The link itself is unlinked, never followed.
        _remove_path(heads / fp)
        for left in [*heads.glob(f"{glob.escape(fp)}.*"), *heads.glob(f".{glob.escape(fp)}.*")]:
            _remove_path(left)

    @_storage_errors
    def get_version(self, fingerprint: str | None = None, *, count_rows: bool = True) -> EmbeddingVersion:
        """Look a version up by fingerprint (or a unique prefix); None gives the active one.

        Only the version found has its rows counted (``count_rows=False``: none).

        Raises
        ------
        LookupError
            When the store has no such version; the message lists the ones it has.
        """
        versions = self._version_rows()
        if not versions:
            raise LookupError(f"store {self.uri!r} holds no embeddings yet; run `clipfuse index` first.")
        found = self._find_version(versions, fingerprint)
        return self._count_rows(found) if count_rows else found

    def _find_version(self, versions: list[EmbeddingVersion], fingerprint: str | None) -> EmbeddingVersion:
        if isinstance(fingerprint, EmbeddingVersion):
            fingerprint = fingerprint.fingerprint
        if fingerprint is None:
            active = [v for v in versions if v.activated_at is not None]
            if not active:
                raise LookupError(f"store {self.uri!r} has no complete embedding version yet; "
                                  "re-run `clipfuse index` to finish the interrupted run.")
            return max(active, key=lambda v: v.activated_at)
        matches = [v for v in versions if v.fingerprint.startswith(fingerprint)]
        if len(matches) != 1:
            listing = ", ".join(f"{v.fingerprint} ({v.model})" for v in versions)
            what = "matches several" if matches else "matches none"
            raise LookupError(f"version {fingerprint!r} {what} of the store's versions: {listing}.")
        return matches[0]

    def _version_table(self, version: EmbeddingVersion):
        table = self._table(version.table)
        if table is None:
            raise LookupError(f"table {version.table!r} of version {version.fingerprint} is missing.")
        return table

    # ---- embeddings ---------------------------------------------------------------------
    @_storage_errors
    def embedded_ids(self, fingerprint: str) -> set[str]:
        """Ids that already have a vector in this version."""
        t = _read_columns(self._version_table(self.get_version(fingerprint, count_rows=False)), ["id"])
        return set(t["id"].to_pylist())

    @_storage_errors
    def add_embeddings(self, fingerprint: str, ids: list[str], vectors: np.ndarray) -> None:
        """Insert vectors for ids not yet present (an id already there is left as it is).

        One LanceDB commit: after a crash the rows are either all there or none.
        """
        version = self.get_version(fingerprint, count_rows=False)
        vectors = _checked_vectors(version, ids, vectors)
        if not len(ids):
            return
        first = {}
        for j, id_ in enumerate(ids):
            first.setdefault(id_, j)  # merge_insert would insert a repeated id twice
        keep = sorted(first.values())
        data = pa.table({
            "id": pa.array([ids[j] for j in keep], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[keep].reshape(-1)), version.dim),
        }, schema=_embeddings_schema(version.dim))
        with self.writer():
            self._version_table(version).merge_insert("id").when_not_matched_insert_all().execute(data)

    def table_uri(self, name: str) -> str:
        """Where LanceDB keeps table ``name``: ``<store>/<name>.lance`` (a local path or a URI)."""
        base = str(Path(self.uri).absolute()) if self.is_local else self.uri.rstrip("/")
        return f"{base}/{name}.lance"

    @_storage_errors
    def append_embeddings(self, fingerprint: str, ids: list[str], vectors: np.ndarray, *,
                          ray_remote_args: dict | None = None) -> None:
        """Append vectors of ids the version does not hold yet with lance-ray's ``write_lance``:
        Ray tasks write the files, this process makes the one commit.

        Unlike :meth:`add_embeddings` it does not look up which ids are there already (that would read the
        whole id column for every shard): the caller holds the writer lock and passes only new ids, as
        the index run does. Needs ``pip install 'clipfuse[ray]'`` and a connected Ray.
        """
        import lance_ray
        import ray
        import ray.data

        if not ray.is_initialized():  # Ray Data would start a Ray instance of its own here
            raise RuntimeError("append_embeddings writes through Ray: connect first (ray.init, or clipfuse's --ray).")
        version = self.get_version(fingerprint, count_rows=False)
        vectors = _checked_vectors(version, ids, vectors)
        if len(set(ids)) != len(ids):
            raise ValueError("append_embeddings was given an id twice; each id gets one vector.")
        if not len(ids):
            return
        schema = _embeddings_schema(version.dim)
        data = pa.table({"id": pa.array(ids, pa.string()),
                         "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), version.dim)},
                        schema=schema)
        with self.writer():
            self._version_table(version)  # fails clearly if the table is gone
            lance_ray.write_lance(ray.data.from_arrow(data), self.table_uri(version.table), schema=schema,
                                  mode="append",
                                  storage_options=with_env_credentials(self.storage_options) if not self.is_local
                                  else None,
                                  ray_remote_args=ray_remote_args or {"num_cpus": 0})  # I/O: no embedding CPU

    def _read_vectors(self, version: EmbeddingVersion, wanted=None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)`` of a version, one row per id (the first, should an id be stored twice);
        with ``wanted``, only those ids.

        The table is streamed batch by batch into one preallocated array, so reading 300,000
        vectors costs their own size, not two or three arrow copies of them.
        """
        table = self._version_table(version)
        capacity = table.count_rows()
        X = np.empty((capacity, version.dim), dtype=np.float32)
        ids: list[str] = []
        seen: set[str] = set()
        reader = table.search().select(["id", "vector"]).limit(None).to_batches()
        for batch in reader:
            batch_ids = batch.column(0).to_pylist()
            keep = []
            for j, id_ in enumerate(batch_ids):
                if id_ not in seen and (wanted is None or id_ in wanted):
                    seen.add(id_)
                    keep.append(j)
            if not keep:
                continue
            vectors = batch.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, version.dim)
            if len(ids) + len(keep) > len(X):  # rows appended by a writer since the count
                X = np.concatenate([X, np.empty((len(ids) + len(keep) - len(X), version.dim), np.float32)])
            X[len(ids):len(ids) + len(keep)] = vectors if len(keep) == len(batch_ids) else vectors[keep]
            ids.extend(batch_ids[j] for j in keep)
        return np.asarray(ids, dtype=object), X[:len(ids)]

    # ---- images and errors ------------------------------------------------------------------
    @_storage_errors
    def upsert_images(self, rows: list[dict]) -> None:
        """Insert or replace image rows by path, in one commit (the last row of a path wins)."""
        rows = list({r["path"]: r for r in rows}.values())  # merge_insert would insert a repeated path twice
        if rows:
            data = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
            with self.writer():
                (self._table(IMAGES, IMAGES_SCHEMA).merge_insert("path")
                 .when_matched_update_all().when_not_matched_insert_all().execute(data))

    def _delete_paths(self, name: str, paths: list[str]) -> None:
        table = self._table(name)
        if table is not None and paths:
            with self.writer():
                for start in range(0, len(paths), 500):
                    table.delete(f"path IN ({_sql_list(paths[start:start + 500])})")

    @_storage_errors
    def delete_images(self, paths: list[str]) -> None:
        """Remove the image rows of some paths (their vectors stay: content may be shared)."""
        self._delete_paths(IMAGES, paths)

    @_storage_errors
    def images(self, ids: list[str] | None = None) -> pa.Table:
        """Every image row, one per path (the latest, should a path be stored twice); with
        ``ids``, only the rows of those contents (read by a filtered scan, not the whole table)."""
        if ids is None:
            t = self._read(IMAGES)
            return _last_by(t, "path", "indexed_at") if t is not None else IMAGES_SCHEMA.empty_table()
        table = self._table(IMAGES)
        if table is None or not ids:
            return IMAGES_SCHEMA.empty_table()

        def rows(column: str, values) -> pa.Table:
            return table.search().where(f"{column} IN ({_sql_list(values)})").limit(None).to_arrow() \
                .select(IMAGES_SCHEMA.names)

        # every row of the paths that ever held these ids, so that a path's latest row decides what it holds
        paths = set(rows("id", ids)["path"].to_pylist())
        latest = _last_by(rows("path", sorted(paths)), "path", "indexed_at") if paths else IMAGES_SCHEMA.empty_table()
        return latest.filter(pc.is_in(latest["id"], pa.array(list(ids), pa.string())))

    @_storage_errors
    def record_errors(self, rows: list[dict]) -> None:
        """Insert or replace index errors by path (``path`` must be valid UTF-8: see
        :func:`clipfuse.data.printable_path`)."""
        rows = list({r["path"]: r for r in rows}.values())
        if rows:
            data = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
            with self.writer():
                (self._table(ERRORS, ERRORS_SCHEMA).merge_insert("path")
                 .when_matched_update_all().when_not_matched_insert_all().execute(data))

    @_storage_errors
    def clear_errors(self, paths: list[str]) -> None:
        """Forget the index errors of some paths."""
        self._delete_paths(ERRORS, paths)

    @_storage_errors
    def errors(self) -> pa.Table:
        """Every index error, one per path."""
        t = self._read(ERRORS)
        return _last_by(t, "path", "at") if t is not None else ERRORS_SCHEMA.empty_table()

    # ---- duplicates written before the writer lock ------------------------------------------------
    # ---- labels set by people (or imported), over the folders' ------------------------------------
    @_storage_errors
    def add_labels(self, rows: list[tuple[str, str | None, str]], *, source: str = "human") -> None:
        """Record label changes ``(id, class or None, given)`` in one commit (None: the image has no label).

        Nothing is ever overwritten: the labels table keeps every change, and an id's last row is its
        label. The caller checks ids and class names (and adds new classes) first.
        """
        if source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {source!r}.")
        if not rows:
            return
        with self.writer():
            table = self._table(LABELS, LABELS_SCHEMA)
            # The last row of an id is its label, ordered by (at, seq): a clock stepped back (NTP, two machines
            # on one s3:// store) must not put a new change before an old one, so ``at`` never goes backwards.
            last = _read_columns(table, ["at"])["at"] if table.count_rows() else None
            latest = max(last.to_pylist()) if last is not None and len(last) else 0.0
            now = max(time.time(), latest + 1e-3)
            data = pa.table({"id": [r[0] for r in rows], "label": [r[1] for r in rows], "source": [source] * len(rows),
                             "given": [r[2] for r in rows], "at": [now] * len(rows), "seq": list(range(len(rows)))},
                            schema=LABELS_SCHEMA)
            table.add(data)

    @_storage_errors
    def label_history(self) -> pa.Table:
        """Every label change, oldest first."""
        t = self._read(LABELS)
        if t is None or not t.num_rows:
            return LABELS_SCHEMA.empty_table()
        return t.sort_by([("at", "ascending"), ("seq", "ascending")])

    def labels(self) -> dict[str, tuple[str | None, str]]:
        """``{id: (class or None, source)}``: the current label of every id that has a labels-table row."""
        history = self.label_history()
        return {id_: (label, source) for id_, label, source in zip(
            history["id"].to_pylist(), history["label"].to_pylist(), history["source"].to_pylist())}

    @_storage_errors
    def duplicates(self) -> dict[str, int]:
        """Rows stored twice (by writers that ran at once before the store had a writer lock).

        Reads hide them; :meth:`repair` removes them. Returns the extra rows per kind:
        ``{"versions", "classes", "images", "errors", "vectors"}``.
        """
        out = {}
        for kind, name, key in (("versions", VERSIONS, "fingerprint"), ("images", IMAGES, "path"),
                                ("errors", ERRORS, "path")):
            t = self._read(name, [key])
            out[kind] = 0 if t is None else t.num_rows - pc.count_distinct(t[key]).as_py()
        t = self._read(CLASSES)
        out["classes"] = 0
        if t is not None:  # rows beyond one per index of a kept name: a repeated name, or two names sharing an index
            first: dict[str, int] = {}  # name -> index of its first row, as classes() keeps them
            for i in np.argsort(t["index"].to_numpy(), kind="stable"):
                first.setdefault(t["name"][int(i)].as_py(), int(t["index"][int(i)].as_py()))
            out["classes"] = t.num_rows - len(set(first.values()))
        names = self._table_names()
        out["vectors"] = 0
        for v in self._version_rows():
            if v.table in names:
                ids = _read_columns(self.db.open_table(v.table), ["id"])["id"]
                out["vectors"] += len(ids) - pc.count_distinct(ids).as_py()
        return out

    @_storage_errors
    def repair(self) -> dict[str, int]:
        """Rewrite every table that holds duplicates with one row per key (one commit each).

        Returns what :meth:`duplicates` counted before the repair.
        """
        with self.writer("repairing the store"):
            found = self.duplicates()
            if found["versions"]:
                rows = [{k: getattr(v, k) for k in VERSIONS_SCHEMA.names} for v in self._version_rows()]
                self._table(VERSIONS).add(pa.Table.from_pylist(rows, schema=VERSIONS_SCHEMA), mode="overwrite")
            if found["classes"]:
                names = self.classes()
                self._table(CLASSES).add(pa.table({"index": pa.array(range(len(names)), pa.int32()),
                                                   "name": pa.array(names, pa.string())}, schema=CLASSES_SCHEMA),
                                         mode="overwrite")
            if found["images"]:
                self._table(IMAGES).add(self.images(), mode="overwrite")
            if found["errors"]:
                self._table(ERRORS).add(self.errors(), mode="overwrite")
            if found["vectors"]:
                names = self._table_names()
                for v in self._version_rows():
                    if v.table not in names:
                        continue
                    table = self.db.open_table(v.table)
                    t = table.to_arrow()
                    keep = _first_rows(t["id"])
                    if keep is not None:
                        table.add(t.take(keep), mode="overwrite")
                        self._ann.pop(v.fingerprint, None)
            return found

    # ---- reading for later stages --------------------------------------------------------------
    @_storage_errors
    def load_embeddings(self, fingerprint: str | None = None) -> EmbeddingSet:
        """Load one version as ``(ids, X, labels)``: one row per image id that has a vector.

        Parameters
        ----------
        fingerprint : str, optional
            Version to load (fingerprint or unique prefix); default the active one.
        """
        version = self.get_version(fingerprint, count_rows=False)
        classes = self.classes()
        class_index = {c: i for i, c in enumerate(classes)}
        meta: dict[str, tuple[str, set]] = {}
        test_meta: dict[str, set] = {}
        images = self.images().select(["id", "split", "label"]).to_pydict()
        for id_, row_split, label in zip(images["id"], images["split"], images["label"]):
            split, labels = meta.get(id_, ("unlabeled", set()))
            if SPLIT_PRIORITY[row_split] < SPLIT_PRIORITY[split]:
                split = row_split
            if row_split == "labeled" and label is not None:
                labels = labels | {label}
            if row_split == "test" and label is not None:
                test_meta.setdefault(id_, set()).add(label)
            meta[id_] = (split, labels)
        del images
        for id_, (label, _) in self.labels().items():  # a label set by a person wins over the folder's
            if id_ not in meta:
                continue
            split, _ = meta[id_]
            if split == "test":
                test_meta[id_] = set() if label is None else {label}
            else:
                meta[id_] = (split, set() if label is None else {label})
        ids, X = self._read_vectors(version, wanted=meta.keys())  # vectors of images no longer indexed are skipped
        labels = np.full(len(ids), -1, dtype=np.int64)
        test_labels = np.full(len(ids), -1, dtype=np.int64)
        splits = np.empty(len(ids), dtype=object)
        conflicts = []
        for j, id_ in enumerate(ids):
            split, names = meta[id_]
            splits[j] = split
            if len(names) == 1:
                labels[j] = class_index[next(iter(names))]
            elif len(names) > 1:
                conflicts.append(id_)
            if split == "test" and len(test_meta.get(id_, ())) == 1:
                test_labels[j] = class_index[next(iter(test_meta[id_]))]
        return EmbeddingSet(ids=ids.astype(str), X=X, labels=labels, splits=splits.astype(str),
                            test_labels=test_labels, classes=classes,
                            fingerprint=version.fingerprint, conflicts=conflicts)

    @_storage_errors
    def vectors_for(self, ids: list[str], fingerprint: str | None = None) -> np.ndarray:
        """Stored vectors of some ids, in order.

        Raises
        ------
        KeyError
            Naming the first id that this version does not hold.
        """
        version = self.get_version(fingerprint, count_rows=False)
        t = self._version_table(version).search().where(f"id IN ({_sql_list(ids)})").limit(None).to_arrow()
        found = dict(zip(t["id"].to_pylist(), t["vector"].to_numpy(zero_copy_only=False)))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"id {missing[0]!r} has no vector in version {version.fingerprint}; "
                           "check the id with `clipfuse info` or index the image first.")
        return np.stack([np.asarray(found[i], dtype=np.float32) for i in ids])

    # ---- neighbour search -----------------------------------------------------------------------
    def _ann_folder(self) -> Path | None:
        """Where the hnswlib indexes live: beside a store on disk; for a store on object storage, in this
        machine's cache (derived data, keyed by the store and the version, rebuilt or extended when behind)."""
        if self.is_local:
            return Path(self.uri) / "_ann"
        if self.uri.startswith("memory://"):
            return None
        import hashlib

        from .objectfolder import cache_root

        return cache_root() / hashlib.sha256(self.uri.encode()).hexdigest()[:16] / "_ann"

    @_storage_errors
    def ann_index(self, fingerprint: str | None = None) -> AnnIndex:
        """The version's hnswlib index: loaded from disk or built, extended with rows added since.

        The embedding table is append-only with unique ids, so an index holding as many
        rows as the table holds all of them, and the table need not be read.
        """
        version = self.get_version(fingerprint)
        fp = version.fingerprint
        index = self._ann.get(fp)
        folder = self._ann_folder()
        if index is None and folder is not None:
            index = AnnIndex.load(folder, fp, self.ann_config)
        if index is None:
            index = AnnIndex(version.dim, self.ann_config)
        if len(index) != version.rows:
            ids, X = self._read_vectors(version)
            if index.extend(ids, X) and folder is not None:
                if self.is_local:
                    # saved under the writer lock if it is free right now: a reader never waits, and a busy or
                    # read-only store still answers from memory (the next query saves it)
                    with contextlib.suppress(OSError), self._lock.hold("saving the neighbour index", timeout=0):
                        index.save(folder, fp)
                else:  # this machine's cache: no store lock needed (files are replaced whole)
                    with contextlib.suppress(OSError):
                        folder.mkdir(parents=True, exist_ok=True)
                        index.save(folder, fp)
        self._ann[fp] = index
        return index

    @_storage_errors
    def search(self, queries: np.ndarray, *, k: int = 10, fingerprint: str | None = None,
               exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k neighbours by cosine similarity.

        Parameters
        ----------
        queries : ndarray of shape (n_queries, dim)
            Unit vectors made by this version's model.
        k : int, default=10
        fingerprint : str, optional
            Version to search; default the active one.
        exact : bool, optional
            Force exact (True) or ANN (False) search; by default exact below
            ``ann_threshold`` rows.

        Returns
        -------
        ids : ndarray of str, shape (n_queries, k')
        sims : ndarray of float32, shape (n_queries, k'), descending; ``k' = min(k, rows)``.
        """
        version = self.get_version(fingerprint)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != version.dim:
            raise ValueError(
                f"query vectors have dim {queries.shape[1]}, but version {version.fingerprint} "
                f"({version.model}) holds {version.dim}-d vectors: the query was made by a different "
                "model. Query with the store's model, or pick a matching version with --version."
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        n = version.rows
        if n == 0:
            return np.zeros((len(queries), 0), dtype=str), np.zeros((len(queries), 0), dtype=np.float32)
        if not (exact if exact is not None else n < self.ann_threshold):
            found, sims = self.ann_index(version.fingerprint).search(queries, k)
            return found.astype(str), sims
        ids, X = self._read_vectors(version)
        k = min(k, len(ids))
        sims = queries @ X.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        return ids[top].astype(str), np.take_along_axis(sims, top, axis=1).astype(np.float32)

    # ---- classifier outputs ---------------------------------------------------------------------
    @staticmethod
    def ensemble_key(fingerprints: list[str]) -> str:
        """Name of an ensemble over several versions: 16 hex digits of the set of fingerprints
        (their order does not matter)."""
        import hashlib

        return hashlib.sha256(",".join(sorted(set(fingerprints))).encode()).hexdigest()[:16]

    def _ensemble_versions(self, versions: list[str]) -> list[str]:
        """The full fingerprints of ``versions`` (each must be one of the store's versions)."""
        found = self._version_rows()
        return [self._find_version(found, fp).fingerprint for fp in versions]

    def heads_name(self, fingerprint: str | None = None, *, versions: list[str] | None = None) -> str:
        """Where beside the tables the heads fitted on a version are saved: ``_heads/<fingerprint>``
        (``versions``: the ensemble over several versions, ``_heads/ensemble-<key>``)."""
        if versions is not None:
            return f"_heads/ensemble-{self.ensemble_key(self._ensemble_versions(versions))}"
        return f"_heads/{self.get_version(fingerprint, count_rows=False).fingerprint}"

    def heads_folder(self, fingerprint: str | None = None, *, versions: list[str] | None = None) -> Path:
        """The local folder of :meth:`heads_name` (a store on disk; see :meth:`object_folder` for S3)."""
        if "://" in self.uri:
            raise ValueError(f"store {self.uri!r} is not on disk, so trained heads can't be saved beside it; "
                             "use a folder or s3://bucket/prefix for --db.")
        return Path(self.uri) / self.heads_name(fingerprint, versions=versions)

    def object_folder(self, name: str):
        """A folder of files beside a store on S3 (:class:`~clipfuse.store.objectfolder.ObjectFolder`)."""
        if not self.uri.startswith("s3://"):
            raise ValueError(f"store {self.uri!r} is not on disk or on S3, so trained heads can't be saved beside "
                             "it; use a folder or s3://bucket/prefix for --db.")
        from .objectfolder import ObjectFolder

        return ObjectFolder(self.uri, name, self.storage_options)

    def _predictions_name(self, version: EmbeddingVersion) -> str:
        return "predictions_" + version.table.removeprefix("embeddings_")

    @_storage_errors
    def remove_predictions(self, *, versions: list[str]) -> bool:
        """Drop the predictions table of the ensemble over ``versions`` (full fingerprints, which
        need not be in the store any more); returns whether there was one."""
        with self.writer():
            name = f"predictions_ensemble_{self.ensemble_key(versions)}"
            if name not in self._table_names():
                return False
            self._drop_table(name)
            return True

    def _predictions_table_name(self, fingerprint: str | None, versions: list[str] | None) -> str:
        if versions is not None:
            return f"predictions_ensemble_{self.ensemble_key(self._ensemble_versions(versions))}"
        return self._predictions_name(self.get_version(fingerprint, count_rows=False))

    @_storage_errors
    def write_predictions(self, predictions: pa.Table, fingerprint: str | None = None, *,
                          versions: list[str] | None = None) -> str:
        """Replace the version's predictions table (one LanceDB commit); returns the table name.

        ``predictions`` needs an ``id`` column; the other columns are the caller's. With
        ``versions`` the table is the one of the ensemble over those versions.
        """
        if "id" not in predictions.column_names:
            raise ValueError("a predictions table needs an 'id' column.")
        with self.writer():
            name = self._predictions_table_name(fingerprint, versions)
            table = self._table(name)
            if table is None:
                self._create_table(name, predictions)
            elif table.schema != predictions.schema:  # other heads, other columns
                self._create_table(name, predictions, mode="overwrite")
            else:
                table.add(predictions, mode="overwrite")
        return name

    @_storage_errors
    def prediction_rows(self, ids: list[str], fingerprint: str | None = None) -> pa.Table | None:
        """The version's predictions of some ids only (a filtered scan); None before `clipfuse predict`."""
        table = self._table(self._predictions_table_name(fingerprint, None))
        if table is None:
            return None
        return table.search().where(f"id IN ({_sql_list(ids)})").limit(None).to_arrow()

    @_storage_errors
    def predictions(self, fingerprint: str | None = None, *, versions: list[str] | None = None) -> pa.Table | None:
        """The version's (or the ensemble over ``versions``') predictions table, or None before
        `clipfuse predict`."""
        return self._read(self._predictions_table_name(fingerprint, versions))

    # ---- maintenance and summary ------------------------------------------------------------------
    @_storage_errors
    def optimize(self) -> None:
        """Compact the small fragments that batched commits leave behind."""
        with self.writer():
            for name in self._table_names():
                self.db.open_table(name).optimize()

    @_storage_errors
    def info(self) -> dict:
        """Tables, row counts per split and class, versions, error count and duplicate rows."""
        images = self.images()
        import polars as pl

        df = pl.from_arrow(images) if images.num_rows else pl.DataFrame(schema={"split": pl.Utf8, "label": pl.Utf8, "id": pl.Utf8})
        per_split = {r["split"]: r["len"] for r in df.group_by("split").len().to_dicts()}

        try:
            active = self.get_version().fingerprint
        except LookupError:
            active = None
        present = set(df["id"].to_list()) if images.num_rows else set()
        set_labels = {k: v for k, v in self.labels().items() if k in present}  # not of images removed since
        folder = df.filter((pl.col("split") == "labeled") & pl.col("label").is_not_null())
        current = dict(zip(folder["id"].to_list(), folder["label"].to_list())) if folder.height else {}
        by_source = {"folder": len(set(current) - set(set_labels))}
        test_only = set(df.filter(pl.col("split") == "test")["id"].to_list()) - set(
            df.filter(pl.col("split") != "test")["id"].to_list()) if images.num_rows else set()
        for id_, (label, source) in set_labels.items():
            key = source if label is not None else f"{source}: no label"
            by_source[key] = by_source.get(key, 0) + 1
            if id_ in test_only:
                continue  # a test image's label scores, it is not trained on
            if label is None:
                current.pop(id_, None)
            else:
                current[id_] = label
        per_class = {}
        for label in current.values():
            per_class[label] = per_class.get(label, 0) + 1
        return {
            "uri": self.uri,
            "labels_by_source": by_source,
            "tables": sorted(self._table_names()),
            "images": images.num_rows,
            "unique_images": df["id"].n_unique() if images.num_rows else 0,
            "per_split": per_split,
            "per_class": {c: per_class.get(c, 0) for c in self.classes()},
            "versions": [v.to_dict() for v in self.versions()],
            "active": active,
            "errors": self.errors().num_rows,
            "duplicates": self.duplicates(),
        }
