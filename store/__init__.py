"""The embedded LanceDB store: images, embedding versions, index errors and neighbour search."""

from .ann import AnnConfig, AnnIndex
from .indexer import IndexConfig, IndexSummary, index_images
from .store import DEFAULT_DB, EmbeddingSet, Store

__all__ = ["AnnConfig", "AnnIndex", "DEFAULT_DB", "EmbeddingSet", "IndexConfig", "IndexSummary", "Store",
           "index_images"]
