"""The embedded LanceDB store: images, embedding versions, index errors and neighbour search.

hnswlib and polars load on first use (the importers, the neighbour index), so opening a store stays quick.
"""

from __future__ import annotations

import importlib

from .ann import AnnConfig, AnnIndex
from .indexer import IndexConfig, IndexSummary, index_images
from .lock import StoreBusyError
from .store import DEFAULT_DB, EmbeddingSet, Store
from .versions import EmbeddingVersion

_LAZY = {"ImportedEmbeddings": "imports", "import_embeddings": "imports", "read_clip_retrieval": "imports",
         "read_npy_table": "imports"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AnnConfig", "AnnIndex", "DEFAULT_DB", "EmbeddingSet", "EmbeddingVersion", "IndexConfig", "IndexSummary",
           "Store", "StoreBusyError", *_LAZY, "index_images"]
