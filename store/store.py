"""The LanceDB store: images, embedding versions, index errors; the only module that talks to LanceDB."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from clipfuse.data import SPLIT_PRIORITY

from .ann import AnnConfig, AnnIndex

DEFAULT_DB = "clipfuse.lance"
IMAGES, ERRORS, VERSIONS, CLASSES = "images", "index_errors", "embedding_versions", "classes"

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
    """

    def __init__(self, uri: str | Path = DEFAULT_DB, *, ann_threshold: int = 50_000, ann_config: AnnConfig | None = None):
        self.uri = str(uri)
        if "://" not in self.uri and Path(self.uri).is_file():
            raise NotADirectoryError(f"--db {self.uri!r} is a file; a store is a folder (e.g. clipfuse.lance).")
        self.ann_threshold = ann_threshold
        self.ann_config = ann_config or AnnConfig()
        self.db = lancedb.connect(self.uri)
        self._ann: dict[str, AnnIndex] = {}

    # ---- tables -------------------------------------------------------------------------
    def _table_names(self) -> set[str]:
        names, token = set(), None
        while True:
            page = self.db.list_tables(page_token=token)
            names.update(page.tables)
            token = page.page_token
            if not token:
                return names

    def _table(self, name: str, schema: pa.Schema | None = None):
        if name in self._table_names():
            return self.db.open_table(name)
        if schema is None:
            return None
        return self.db.create_table(name, schema=schema, exist_ok=True)

    def _read(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        table = self._table(name)
        if table is None:
            return None
        return _read_columns(table, columns) if columns else table.to_arrow()

    @property
    def is_empty(self) -> bool:
        return VERSIONS not in self._table_names()

    # ---- classes ------------------------------------------------------------------------
    def classes(self) -> list[str]:
        """Ordered class names; a class keeps its index for the life of the store."""
        t = self._read(CLASSES)
        if t is None:
            return []
        order = np.argsort(t["index"].to_numpy())
        return [t["name"][int(i)].as_py() for i in order]

    def add_classes(self, names: list[str]) -> list[str]:
        """Append the names not yet known; return the full class list."""
        known = self.classes()
        new = [n for n in names if n not in known]
        if new:
            rows = pa.table({"index": pa.array(range(len(known), len(known) + len(new)), pa.int32()),
                             "name": pa.array(new, pa.string())}, schema=CLASSES_SCHEMA)
            self._table(CLASSES, CLASSES_SCHEMA).add(rows)
        return known + new

    # ---- embedding versions ---------------------------------------------------------------
    def versions(self) -> list[dict]:
        """Every embedding version, oldest first, with its row count."""
        t = self._read(VERSIONS)
        if t is None:
            return []
        rows = sorted(t.to_pylist(), key=lambda r: r["created_at"])
        names = self._table_names()
        for r in rows:
            r["rows"] = self.db.open_table(r["table"]).count_rows() if r["table"] in names else 0
        return rows

    def register_version(self, info: dict, *, source: str = "index") -> dict:
        """Record the model behind an embedding version (idempotent) and create its table.

        ``info`` holds ``fingerprint, model, pretrained, weights_hash, preprocess, dim``
        and optionally ``random_weights``, as :class:`clipfuse.embed.ModelInfo` gives it.
        """
        fp = info["fingerprint"]
        for v in self.versions():
            if v["fingerprint"] == fp:
                if v["dim"] != info["dim"]:
                    raise ValueError(f"version {fp} is recorded with dim {v['dim']}, got {info['dim']}.")
                return v
        row = {
            "fingerprint": fp, "table": f"embeddings_{fp}", "model": info["model"],
            "pretrained": info.get("pretrained"), "weights_hash": info.get("weights_hash"),
            "preprocess": info.get("preprocess"), "dim": int(info["dim"]),
            "random_weights": bool(info.get("random_weights", False)), "source": source,
            "created_at": time.time(), "activated_at": None,
        }
        self._table(row["table"], _embeddings_schema(row["dim"]))
        self._table(VERSIONS, VERSIONS_SCHEMA).add(pa.Table.from_pylist([row], schema=VERSIONS_SCHEMA))
        return {**row, "rows": 0}

    def activate(self, fingerprint: str) -> None:
        """Make a version the default of neighbour queries and later stages."""
        fp = self.get_version(fingerprint)["fingerprint"]
        self._table(VERSIONS).update(where=f"fingerprint = '{fp}'", values={"activated_at": time.time()})

    def get_version(self, fingerprint: str | None = None) -> dict:
        """Look a version up by fingerprint (or a unique prefix); None gives the active one.

        Raises
        ------
        LookupError
            When the store has no such version; the message lists the ones it has.
        """
        versions = self.versions()
        if not versions:
            raise LookupError(f"store {self.uri!r} holds no embeddings yet; run `clipfuse index` first.")
        if fingerprint is None:
            active = [v for v in versions if v["activated_at"] is not None]
            if not active:
                raise LookupError(f"store {self.uri!r} has no complete embedding version yet; "
                                  "re-run `clipfuse index` to finish the interrupted run.")
            return max(active, key=lambda v: v["activated_at"])
        matches = [v for v in versions if v["fingerprint"].startswith(fingerprint)]
        if len(matches) != 1:
            listing = ", ".join(f"{v['fingerprint']} ({v['model']})" for v in versions)
            what = "matches several" if matches else "matches none"
            raise LookupError(f"version {fingerprint!r} {what} of the store's versions: {listing}.")
        return matches[0]

    def _version_table(self, version: dict):
        table = self._table(version["table"])
        if table is None:
            raise LookupError(f"table {version['table']!r} of version {version['fingerprint']} is missing.")
        return table

    # ---- embeddings ---------------------------------------------------------------------
    def embedded_ids(self, fingerprint: str) -> set[str]:
        """Ids that already have a vector in this version."""
        t = _read_columns(self._version_table(self.get_version(fingerprint)), ["id"])
        return set(t["id"].to_pylist())

    def add_embeddings(self, fingerprint: str, ids: list[str], vectors: np.ndarray) -> None:
        """Insert vectors for ids not yet present (an id already there is left as it is).

        One LanceDB commit: after a crash the rows are either all there or none.
        """
        version = self.get_version(fingerprint)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != version["dim"]:
            raise ValueError(f"version {version['fingerprint']} holds {version['dim']}-d vectors, "
                             f"got an array of shape {vectors.shape}.")
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors.")
        if not len(ids):
            return
        data = pa.table({
            "id": pa.array(ids, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), version["dim"]),
        }, schema=_embeddings_schema(version["dim"]))
        self._version_table(version).merge_insert("id").when_not_matched_insert_all().execute(data)

    def _read_vectors(self, version: dict) -> tuple[np.ndarray, np.ndarray]:
        t = self._version_table(version).to_arrow()
        vec = t["vector"].combine_chunks()
        X = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, version["dim"])
        return np.asarray(t["id"].to_pylist(), dtype=object), np.ascontiguousarray(X, dtype=np.float32)

    # ---- images and errors ------------------------------------------------------------------
    def upsert_images(self, rows: list[dict]) -> None:
        """Insert or replace image rows by path, in one commit (the last row of a path wins)."""
        rows = list({r["path"]: r for r in rows}.values())  # merge_insert would insert a repeated path twice
        if rows:
            data = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
            (self._table(IMAGES, IMAGES_SCHEMA).merge_insert("path")
             .when_matched_update_all().when_not_matched_insert_all().execute(data))

    def _delete_paths(self, name: str, paths: list[str]) -> None:
        table = self._table(name)
        if table is not None and paths:
            for start in range(0, len(paths), 500):
                table.delete(f"path IN ({_sql_list(paths[start:start + 500])})")

    def delete_images(self, paths: list[str]) -> None:
        """Remove the image rows of some paths (their vectors stay: content may be shared)."""
        self._delete_paths(IMAGES, paths)

    def images(self) -> pa.Table:
        """Every image row (one per path)."""
        t = self._read(IMAGES)
        return t if t is not None else IMAGES_SCHEMA.empty_table()

    def record_errors(self, rows: list[dict]) -> None:
        if rows:
            data = pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
            (self._table(ERRORS, ERRORS_SCHEMA).merge_insert("path")
             .when_matched_update_all().when_not_matched_insert_all().execute(data))

    def clear_errors(self, paths: list[str]) -> None:
        """Forget the index errors of some paths."""
        self._delete_paths(ERRORS, paths)

    def errors(self) -> pa.Table:
        t = self._read(ERRORS)
        return t if t is not None else ERRORS_SCHEMA.empty_table()

    # ---- reading for later stages --------------------------------------------------------------
    def load_embeddings(self, fingerprint: str | None = None) -> EmbeddingSet:
        """Load one version as ``(ids, X, labels)``: one row per image id that has a vector.

        Parameters
        ----------
        fingerprint : str, optional
            Version to load (fingerprint or unique prefix); default the active one.
        """
        version = self.get_version(fingerprint)
        ids, X = self._read_vectors(version)
        classes = self.classes()
        class_index = {c: i for i, c in enumerate(classes)}
        meta: dict[str, tuple[str, set]] = {}
        test_meta: dict[str, set] = {}
        images = self.images().select(["id", "split", "label"]).to_pylist()
        for r in images:
            split, labels = meta.get(r["id"], ("unlabeled", set()))
            if SPLIT_PRIORITY[r["split"]] < SPLIT_PRIORITY[split]:
                split = r["split"]
            if r["split"] == "labeled" and r["label"] is not None:
                labels = labels | {r["label"]}
            if r["split"] == "test" and r["label"] is not None:
                test_meta.setdefault(r["id"], set()).add(r["label"])
            meta[r["id"]] = (split, labels)
        keep = np.array([i in meta for i in ids], dtype=bool)
        ids, X = ids[keep], X[keep]
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
                            fingerprint=version["fingerprint"], conflicts=conflicts)

    def vectors_for(self, ids: list[str], fingerprint: str | None = None) -> np.ndarray:
        """Stored vectors of some ids, in order.

        Raises
        ------
        KeyError
            Naming the first id that this version does not hold.
        """
        version = self.get_version(fingerprint)
        t = self._version_table(version).search().where(f"id IN ({_sql_list(ids)})").limit(len(ids)).to_arrow()
        found = dict(zip(t["id"].to_pylist(), t["vector"].to_numpy(zero_copy_only=False)))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"id {missing[0]!r} has no vector in version {version['fingerprint']}; "
                           "check the id with `clipfuse info` or index the image first.")
        return np.stack([np.asarray(found[i], dtype=np.float32) for i in ids])

    # ---- neighbour search -----------------------------------------------------------------------
    def _ann_folder(self) -> Path | None:
        return None if "://" in self.uri else Path(self.uri) / "_ann"

    def ann_index(self, fingerprint: str | None = None) -> AnnIndex:
        """The version's hnswlib index: loaded from disk or built, extended with rows added since.

        The embedding table is append-only with unique ids, so an index holding as many
        rows as the table holds all of them, and the table need not be read.
        """
        version = self.get_version(fingerprint)
        fp = version["fingerprint"]
        index = self._ann.get(fp)
        folder = self._ann_folder()
        if index is None and folder is not None:
            index = AnnIndex.load(folder, fp, self.ann_config)
        if index is None:
            index = AnnIndex(version["dim"], self.ann_config)
        if len(index) != version["rows"]:
            ids, X = self._read_vectors(version)
            if index.extend(ids, X) and folder is not None:
                index.save(folder, fp)
        self._ann[fp] = index
        return index

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
        if queries.shape[1] != version["dim"]:
            raise ValueError(
                f"query vectors have dim {queries.shape[1]}, but version {version['fingerprint']} "
                f"({version['model']}) holds {version['dim']}-d vectors: the query was made by a different "
                "model. Query with the store's model, or pick a matching version with --version."
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        n = version["rows"]
        if n == 0:
            return np.zeros((len(queries), 0), dtype=str), np.zeros((len(queries), 0), dtype=np.float32)
        if not (exact if exact is not None else n < self.ann_threshold):
            found, sims = self.ann_index(version["fingerprint"]).search(queries, k)
            return found.astype(str), sims
        ids, X = self._read_vectors(version)
        k = min(k, len(ids))
        sims = queries @ X.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        return ids[top].astype(str), np.take_along_axis(sims, top, axis=1).astype(np.float32)

    # ---- classifier outputs ---------------------------------------------------------------------
    def heads_folder(self, fingerprint: str | None = None) -> Path:
        """Folder beside the tables where the heads fitted on a version are saved."""
        if "://" in self.uri:
            raise ValueError(f"store {self.uri!r} is not on disk, so trained heads can't be saved beside it; "
                             "use a folder for --db.")
        return Path(self.uri) / "_heads" / self.get_version(fingerprint)["fingerprint"]

    def _predictions_name(self, version: dict) -> str:
        return "predictions_" + version["table"].removeprefix("embeddings_")

    def write_predictions(self, predictions: pa.Table, fingerprint: str | None = None) -> str:
        """Replace the version's predictions table (one LanceDB commit); returns the table name.

        ``predictions`` needs an ``id`` column; the other columns are the caller's.
        """
        if "id" not in predictions.column_names:
            raise ValueError("a predictions table needs an 'id' column.")
        name = self._predictions_name(self.get_version(fingerprint))
        table = self._table(name)
        if table is None:
            self.db.create_table(name, predictions)
        elif table.schema != predictions.schema:  # other heads, other columns
            self.db.create_table(name, predictions, mode="overwrite")
        else:
            table.add(predictions, mode="overwrite")
        return name

    def predictions(self, fingerprint: str | None = None) -> pa.Table | None:
        """The version's predictions table, or None before `clipfuse predict`."""
        return self._read(self._predictions_name(self.get_version(fingerprint)))

    # ---- maintenance and summary ------------------------------------------------------------------
    def optimize(self) -> None:
        """Compact the small fragments that batched commits leave behind."""
        for name in self._table_names():
            self.db.open_table(name).optimize()

    def info(self) -> dict:
        """Tables, row counts per split and class, versions and error count."""
        images = self.images()
        import polars as pl

        df = pl.from_arrow(images) if images.num_rows else pl.DataFrame(schema={"split": pl.Utf8, "label": pl.Utf8, "id": pl.Utf8})
        per_split = {r["split"]: r["len"] for r in df.group_by("split").len().to_dicts()}
        per_class = {r["label"]: r["len"] for r in df.filter(pl.col("split") == "labeled").group_by("label").len().to_dicts()}
        try:
            active = self.get_version()["fingerprint"]
        except LookupError:
            active = None
        return {
            "uri": self.uri,
            "tables": sorted(self._table_names()),
            "images": images.num_rows,
            "unique_images": df["id"].n_unique() if images.num_rows else 0,
            "per_split": per_split,
            "per_class": {c: per_class.get(c, 0) for c in self.classes()},
            "versions": self.versions(),
            "active": active,
            "errors": self.errors().num_rows,
        }
