"""Bring precomputed embeddings into the store: clip-retrieval output or a generic .npy + table."""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from clipfuse.data import SPLITS, hash_bytes, read_regular_file

from .store import Store

PATH_COLUMNS = ("path", "image_path", "filepath", "file", "url")


@dataclass
class ImportedEmbeddings:
    """Vectors read from files, with one metadata row per vector."""

    vectors: np.ndarray  # (n, dim) float32, unit rows
    meta: pl.DataFrame  # columns: path (str), and optionally id, label, split
    source: str  # what the vectors came from, for the version record


def _shard_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem))


def _read_table(path: Path) -> pl.DataFrame:
    if path.suffix not in (".parquet", ".csv", ".tsv"):
        raise ValueError(f"metadata file {str(path)!r} must be .parquet, .csv or .tsv.")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, separator="\t" if path.suffix == ".tsv" else ",", infer_schema_length=0)
    except (pl.exceptions.PolarsError, pa.ArrowException) as e:
        raise ValueError(f"can't read metadata file {str(path)!r}: {e}") from e


def _normalise_meta(meta: pl.DataFrame, where: str) -> pl.DataFrame:
    path_col = next((c for c in PATH_COLUMNS if c in meta.columns), None)
    if path_col is None and "id" not in meta.columns:
        raise ValueError(f"{where} has columns {meta.columns}; it needs a path column "
                         f"(one of {', '.join(PATH_COLUMNS)}) or an 'id' column.")
    keep = {path_col: "path"} if path_col else {}
    keep.update({c: c for c in ("id", "label", "split") if c in meta.columns})
    meta = meta.select([pl.col(c).cast(pl.Utf8).alias(n) for c, n in keep.items()])
    return meta if "path" in meta.columns else meta.with_columns(pl.lit(None, pl.Utf8).alias("path"))


def _as_unit_float32(vectors: np.ndarray, where: str) -> np.ndarray:
    """Unit rows as float32, normalised in float64 so that rows of any magnitude keep their direction.

    (In float32 the norm of a row of ~1e30 values overflows to inf, which turned it into
    zeros, and a row of ~1e-30 values underflows to a norm of 0.)
    """
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise ValueError(f"{where} holds an array of shape {vectors.shape}; expected (n_images, dim) with at least "
                         "one image and one dimension.")
    if not np.issubdtype(vectors.dtype, np.number) or np.iscomplexobj(vectors):
        raise ValueError(f"{where} holds {vectors.dtype} values; expected real numbers (float32 or float16).")
    vectors = vectors.astype(np.float64)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{where} contains NaN or infinite values.")
    scale = np.abs(vectors).max(axis=1, keepdims=True)  # a row's largest entry first: no over- or underflow
    zero = scale[:, 0] == 0
    if zero.any():
        raise ValueError(f"{where} has {int(zero.sum())} all-zero vectors (first: row {int(np.flatnonzero(zero)[0])}), "
                         "which have no direction.")
    vectors = vectors / scale
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def read_clip_retrieval(folder: str | os.PathLike) -> ImportedEmbeddings:
    """Read clip-retrieval's output: ``img_emb/img_emb_*.npy`` and ``metadata/metadata_*.parquet``.

    Shards are paired by their number; each pair must have the same row count.
    """
    folder = Path(folder)
    npys = sorted((folder / "img_emb").glob("*.npy"), key=_shard_key)
    tables = sorted((folder / "metadata").glob("*.parquet"), key=_shard_key)
    if not npys or len(npys) != len(tables):
        raise ValueError(f"{str(folder)!r} is not a clip-retrieval output folder: expected img_emb/*.npy and as "
                         f"many metadata/*.parquet (found {len(npys)} and {len(tables)}).")
    vectors, metas = [], []
    for npy, table in zip(npys, tables):
        v, m = np.load(npy, allow_pickle=False), _read_table(table)
        if len(v) != len(m):
            raise ValueError(f"{npy.name} has {len(v)} vectors but {table.name} has {len(m)} rows; "
                             "the shards must pair up one-to-one.")
        vectors.append(_as_unit_float32(v, str(npy)))
        metas.append(_normalise_meta(m, str(table)))
    return ImportedEmbeddings(np.concatenate(vectors), pl.concat(metas, how="diagonal"), "clip-retrieval")


def read_npy_table(npy: str | os.PathLike, table: str | os.PathLike) -> ImportedEmbeddings:
    """Read a generic ``.npy`` of vectors and a parquet/CSV table with one row per vector.

    The table needs a path column (``path``/``image_path``/...) or an ``id`` column, and may
    have ``label`` and ``split`` columns.
    """
    npy, table = Path(npy), Path(table)
    vectors = _as_unit_float32(np.load(npy, allow_pickle=False), str(npy))
    meta = _normalise_meta(_read_table(table), str(table))
    if len(vectors) != len(meta):
        raise ValueError(f"{npy.name} has {len(vectors)} vectors but {table.name} has {len(meta)} rows.")
    return ImportedEmbeddings(vectors, meta, f"npy:{npy.name}")


def _file_row(path: str) -> dict | None:
    from PIL import Image

    try:
        data, st = read_regular_file(path)
    except (OSError, ValueError):  # missing, not a regular file (a FIFO would hang), or over the size cap
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # the vector is what matters; a header Pillow can't parse just leaves size unknown
        width = height = 0
    return {"id": hash_bytes(data), "bytes": st.st_size, "mtime": st.st_mtime, "width": width, "height": height}


def import_embeddings(store: Store, data: ImportedEmbeddings, *, model_info: dict | None = None,
                      image_root: str | os.PathLike | None = None, split: str = "unlabeled") -> dict:
    """Write imported vectors into the store as an embedding version and make it active.

    Parameters
    ----------
    store : Store
    data : ImportedEmbeddings
    model_info : dict, optional
        ``ModelInfo.to_dict()`` of the model that made the vectors, when it can be loaded
        here: then images and texts can be queried against them. Without it the version
        is fingerprinted by the vectors' bytes and only id queries work.
    image_root : path-like, optional
        Folder that relative paths in the metadata are resolved against; they must stay
        inside it (``../`` out of it is refused).
    split : str, default "unlabeled"
        Split of rows whose metadata has no ``split`` column; rows with a ``label`` and
        no split are ``labeled``.

    Returns
    -------
    dict
        ``{"fingerprint", "rows", "hashed", "images", "duplicate_ids", "conflicting_ids",
        "duplicate_paths", "example"}``: a content id given twice keeps its first vector
        (``conflicting_ids`` of them came with a different vector), a path given twice
        keeps its first row; ``example`` names one such row.

    Raises
    ------
    ValueError
        For metadata that can't be imported as it is; nothing is written then.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    meta, vectors = data.meta, data.vectors
    dim = vectors.shape[1]
    if model_info is not None and model_info["dim"] != dim:
        raise ValueError(f"the vectors are {dim}-d but model {model_info['model']!r} makes "
                         f"{model_info['dim']}-d vectors: they were not made by that model.")
    root = os.path.abspath(image_root) if image_root else None
    ids, image_rows, unreadable, escaping, hashed = [], [], [], [], 0
    now = time.time()
    for row in meta.iter_rows(named=True):
        path = row.get("path")
        if path is not None and root is not None and not os.path.isabs(path):
            joined = os.path.normpath(os.path.join(root, path))
            if os.path.commonpath([root, joined]) != root:
                escaping.append(path)
                continue
            path = joined
        path = os.path.normpath(os.path.abspath(path)) if path is not None else None
        file_row = _file_row(path) if path is not None else None
        id_ = row.get("id") or (file_row or {}).get("id")
        hashed += not row.get("id") and id_ is not None
        if id_ is None:
            unreadable.append(path)
            continue
        ids.append(id_)
        label = row.get("label")
        row_split = row.get("split") or ("labeled" if label else split)
        if row_split not in SPLITS:
            raise ValueError(f"row for {path or id_!r} has split {row_split!r}; use one of {SPLITS}.")
        image_rows.append({"id": id_, "path": path or f"id:{id_}", "split": row_split, "label": label,
                           "indexed_at": now, **{k: v for k, v in (file_row or {}).items() if k != "id"}})
    if escaping:
        raise ValueError(
            f"{len(escaping)} relative paths lead out of --image-root {root!r} (first: {escaping[0]!r}); relative "
            "paths must stay inside it. Fix the metadata, give absolute paths, or pass the right --image-root. "
            "Nothing was imported."
        )
    if unreadable:
        raise ValueError(
            f"{len(unreadable)} rows have no 'id' column value and an image file that can't be read "
            f"(first: {unreadable[0]!r}), so they get no content id. Pass --image-root for relative paths, "
            "or add an 'id' column to the metadata."
        )
    first: dict[str, int] = {}
    conflicting, example = 0, None
    for i, id_ in enumerate(ids):
        j = first.setdefault(id_, i)
        if j != i:
            example = example or f"id {id_!r} (rows {j} and {i})"
            conflicting += not np.allclose(vectors[i], vectors[j], atol=1e-6)
    order = sorted(first.values())
    unique_rows: dict[str, dict] = {}
    for i, r in enumerate(image_rows):
        if unique_rows.setdefault(r["path"], r) is not r and example is None:
            example = f"path {r['path']!r} (row {i})"
    if model_info is None:
        h = hashlib.sha256(vectors.tobytes())
        h.update("\n".join(ids).encode())
        model_info = {"fingerprint": h.hexdigest()[:16], "model": f"imported:{data.source}", "pretrained": None,
                      "weights_hash": None, "preprocess": None, "dim": dim}
    with store.writer("clipfuse import-embeddings"):
        store.repair()
        store.register_version(model_info, source=f"import:{data.source}")
        store.add_classes(sorted({r["label"] for r in image_rows if r["label"]}))
        fp = model_info["fingerprint"]
        for start in range(0, len(order), 10_000):
            chunk = order[start:start + 10_000]
            store.add_embeddings(fp, [ids[i] for i in chunk], vectors[chunk])
        store.upsert_images(list(unique_rows.values()))
        store.activate(fp)
        store.optimize()
    return {"fingerprint": fp, "rows": len(order), "images": len(unique_rows), "hashed": hashed,
            "duplicate_ids": len(ids) - len(order), "conflicting_ids": conflicting,
            "duplicate_paths": len(image_rows) - len(unique_rows), "example": example}
