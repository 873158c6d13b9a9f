"""The embedded LanceDB store: images, embedding versions, index errors and neighbour search."""

from .ann import AnnConfig, AnnIndex
from .imports import ImportedEmbeddings, import_embeddings, read_clip_retrieval, read_npy_table
from .indexer import IndexConfig, IndexSummary, index_images
from .lock import StoreBusyError
from .store import DEFAULT_DB, EmbeddingSet, Store

__all__ = ["AnnConfig", "AnnIndex", "DEFAULT_DB", "EmbeddingSet", "ImportedEmbeddings", "IndexConfig", "IndexSummary", "Store", "StoreBusyError",
           "import_embeddings", "index_images", "read_clip_retrieval", "read_npy_table"]
