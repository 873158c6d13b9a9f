"""Neighbour queries: what a query means (an image file, an id, a text) and who its neighbours are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clipfuse.data import IMAGE_EXTENSIONS, hash_bytes, read_regular_file
from clipfuse.store import EmbeddingVersion, Store

from .models import version_embedder
from .results import Neighbor, OptionError

QUERY_OPTION = "IMAGE_OR_ID"


def resolve_query(store: Store, version: EmbeddingVersion, query: str | None, text: str | None, *, model_config=None,
                  device: str = "auto", notify=lambda notice: None, progress=None) -> tuple[np.ndarray, str]:
    """``(vector (1, dim), description)`` of an image file, an image id or a text.

    A file whose content the version holds uses the stored vector and loads no model;
    ``model_config`` names the model to embed with (None: the version's own).
    """
    if text is not None:
        if version.imported:
            raise ValueError(f"version {version.fingerprint} was imported without a model, so texts can't be "
                             "embedded for it; re-import with --model, or query by image id.")
        from clipfuse.embed import is_image_only

        if is_image_only(model_config.model if model_config else version.model):
            raise ValueError(f"version {version.short} was made by {version.model}, an image-only "
                             "backbone with no text tower; query by image, or pick a CLIP version with --version.")
        embedder = version_embedder(version, model_config, device, notify=notify, progress=progress, store=store)
        return embedder.encode_texts([text]), f"text {text!r}"
    from clipfuse.data.remote import is_uri

    if is_uri(query):  # an image on object storage: its stored vector, or embedded now
        from clipfuse.embed.images import decode_record, read_image_bytes

        record, data = read_image_bytes(query, storage_options=store.folder_storage_options)
        if data is None:
            raise OptionError(QUERY_OPTION, f"can't read query image {query!r}: {record.error}.")
        if model_config is None:
            try:
                return store.vectors_for([record.id], version.fingerprint), f"{query} (id {record.id}, stored vector)"
            except KeyError:
                pass
        if version.imported:
            raise ValueError(f"{query} is not in imported version {version.fingerprint} and the version has no "
                             "model to embed it with; re-import with --model.")
        embedder = version_embedder(version, model_config, device, notify=notify, progress=progress, store=store)
        img = decode_record(record, data, draft_size=embedder.draft_size)  # decoded as the version decodes
        if img is None:
            raise OptionError(QUERY_OPTION, f"can't read query image {query!r}: {record.error}.")
        return embedder.encode_images([img]), f"{query} (embedded now)"
    path = Path(query)
    if path.exists() and not path.is_dir():
        try:
            data, _ = read_regular_file(path)
        except OSError as e:
            raise OptionError(QUERY_OPTION, f"can't read query image {query!r}: {e.strerror or e}.") from e
        id_ = hash_bytes(data)
        if model_config is None:
            try:
                return store.vectors_for([id_], version.fingerprint), f"{path} (id {id_}, stored vector)"
            except KeyError:
                pass
        if version.imported:
            raise ValueError(f"{path} is not in imported version {version.fingerprint} and the version has no "
                             "model to embed it with; re-import with --model.")
        embedder = version_embedder(version, model_config, device, notify=notify, progress=progress, store=store)
        record, img = embedder.read_image(str(path))  # decoded as the version decodes
        if img is None:
            raise OptionError(QUERY_OPTION, f"can't read query image {str(path)!r}: {record.error}.")
        return embedder.encode_images([img]), f"{path} (embedded now)"
    try:  # an id, which may look like a path ("train/0001")
        return store.vectors_for([query], version.fingerprint), f"id {query}"
    except KeyError:
        if not (path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS or os.sep in query):
            raise
    what = "is a folder" if path.is_dir() else "does not exist"
    raise OptionError(QUERY_OPTION, f"query image {query!r} {what}, and no image of version {version.short} "
                                    "has that id; pass an existing image file or an image id.")


def describe_neighbors(store: Store, ids, sims) -> list[Neighbor]:
    """One :class:`Neighbor` per found id, reading only those ids' image rows."""
    ids = [str(i) for i in ids]
    by_id: dict[str, list[dict]] = {}
    for r in store.images(ids).select(["id", "path", "label", "split"]).to_pylist():
        by_id.setdefault(r["id"], []).append(r)
    out = []
    for rank, (id_, sim) in enumerate(zip(ids, sims), start=1):
        rows = sorted(by_id.get(id_, []), key=lambda r: r["path"])
        labels = sorted({r["label"] for r in rows if r["label"]})
        out.append(Neighbor(rank=rank, id=id_, paths=[r["path"] for r in rows], label=",".join(labels) or None,
                            split=rows[0]["split"] if rows else None, similarity=round(float(sim), 6)))
    return out
