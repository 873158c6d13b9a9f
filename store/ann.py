"""An hnswlib index derived from one embedding version, saved beside the LanceDB tables."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class AnnConfig:
    """Graph and search parameters of the hnswlib index (cosine via inner product on unit vectors)."""

    m: int = 32  # graph degree; higher = better recall, bigger index (see bench/search.py)
    ef_construction: int = 100  # build-time beam width
    ef_search: int = 128  # query-time beam width (raised to at least k)
    threads: int = 0  # <= 0: all cores


def _threads(config: AnnConfig) -> int:
    # hnswlib 0.8 takes -1 as "all cores" only per call; stored as the index default it
    # silently means one thread, so always hand it a real count.
    return config.threads if config.threads > 0 else (os.cpu_count() or 1)


class AnnIndex:
    """hnswlib index over the rows of an embedding version, keyed by row position.

    ``ids[label]`` maps hnswlib labels back to image ids. The index only ever grows:
    :meth:`extend` adds ids it has not seen, so the store can keep it in step with an
    append-only embedding table without rebuilding it.
    """

    def __init__(self, dim: int, config: AnnConfig | None = None):
        self.dim = dim
        self.config = config or AnnConfig()
        self.ids = np.zeros(0, dtype=object)
        self._position: dict[str, int] = {}
        import hnswlib  # imported on first use: opening a store needs no index library

        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(max_elements=1024, ef_construction=self.config.ef_construction, M=self.config.m)
        self._index.set_num_threads(_threads(self.config))

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: np.ndarray, X: np.ndarray) -> int:
        """Add the rows whose ids are not yet in the index; return how many were added."""
        seen = set(self._position)
        new = np.zeros(len(ids), dtype=bool)
        for j, id_ in enumerate(ids):  # an id given twice is added once
            if id_ not in seen:
                seen.add(id_)
                new[j] = True
        if not new.any():
            return 0
        ids, X = np.asarray(ids, dtype=object)[new], np.ascontiguousarray(X[new], dtype=np.float32)
        start = len(self.ids)
        needed = start + len(ids)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
        self._index.add_items(X, np.arange(start, needed), num_threads=_threads(self.config))
        self.ids = np.concatenate([self.ids, ids])
        self._position.update((id_, start + j) for j, id_ in enumerate(ids))
        return len(ids)

    def vector(self, id_: str) -> np.ndarray:
        """The stored unit vector of one id (the graph keeps every vector); KeyError if it holds none."""
        return np.asarray(self._index.get_items([self._position[id_]]), dtype=np.float32)[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by cosine.

        Returns
        -------
        ids : ndarray of object, shape (n_queries, k)
        sims : ndarray of float32, shape (n_queries, k)
        """
        k = min(k, len(self.ids))
        self._index.set_ef(max(self.config.ef_search, k))
        labels, dist = self._index.knn_query(np.ascontiguousarray(queries, dtype=np.float32), k=k,
                                             num_threads=_threads(self.config))
        return self.ids[labels], (1.0 - dist).astype(np.float32)

    def save(self, folder: str | os.PathLike, name: str) -> None:
        """Write ``name.hnsw`` (the graph), ``name.ids.npy`` and ``name.json`` into ``folder``.

        Each file is written to a unique temporary file and renamed, so a crash never
        leaves a half-written index behind (and :meth:`load` checks that the three agree).
        """
        from clipfuse.data import write_text_atomic, write_with

        folder = Path(folder)
        write_with(folder / f"{name}.hnsw", self._index.save_index)
        write_with(folder / f"{name}.ids.npy", lambda p: _save_npy(Path(p), self.ids.astype(str)))
        write_text_atomic(folder / f"{name}.json", json.dumps({"dim": self.dim, "n": len(self.ids), **vars(self.config)}))

    @classmethod
    def load(cls, folder: str | os.PathLike, name: str, config: AnnConfig | None = None) -> AnnIndex | None:
        """Load an index written by :meth:`save`; None if absent or inconsistent.

        The graph keeps the ``m`` and ``ef_construction`` it was built with; search-time
        settings (``ef_search``, ``threads``) come from ``config``.
        """
        folder = Path(folder)
        try:
            meta = json.loads((folder / f"{name}.json").read_text())
            ids = np.load(folder / f"{name}.ids.npy", allow_pickle=False).astype(object)
        except (OSError, ValueError):
            return None
        if meta.get("n") != len(ids) or len(set(ids)) != len(ids):  # an index built with an id twice is rebuilt
            return None
        config = config or AnnConfig()
        config = AnnConfig(m=meta.get("m", config.m), ef_construction=meta.get("ef_construction", config.ef_construction),
                           ef_search=config.ef_search, threads=config.threads)
        self = cls.__new__(cls)
        self.dim, self.config, self.ids = meta["dim"], config, ids
        self._position = {id_: j for j, id_ in enumerate(ids)}
        import hnswlib

        self._index = hnswlib.Index(space="ip", dim=self.dim)
        try:
            self._index.load_index(str(folder / f"{name}.hnsw"), max_elements=max(len(ids), 1024))
        except RuntimeError:
            return None
        if self._index.get_current_count() != len(ids):
            return None
        self._index.set_num_threads(_threads(config))
        return self


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object keeps np.save from appending ".npy" to the name
        np.save(f, array, allow_pickle=False)
