"""Reading a store for review: the overview, one filtered gallery page, an image's details, its file and
thumbnail. The review app (``clipfuse serve``) is a face over these; a notebook can call them too."""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .results import Neighbor, OptionError, _Result

GALLERY_SORTS = ("confidence", "-confidence", "margin", "ood", "path")  # margin: the least sure first; ood: the
# most out of distribution first (images without an OOD score last)
THUMB_SIZES = (128, 256, 512, 1024)
MAX_PAGE = 500


@dataclass
class GalleryRow:
    id: str
    path: str  # the first path the store holds for this content
    split: str
    label: Optional[str]  # its label now (a person's over the folder's), None when unlabeled
    predicted: Optional[str]  # the fused prediction, None before `predict`
    confidence: Optional[float]
    margin: Optional[float]  # top-1 minus top-2 fused probability
    heads_agree: Optional[bool]  # every head's top class is the fused one (None: no per-head predictions)


@dataclass
class GalleryPage(_Result):
    version: str
    rows: list[GalleryRow]
    total: int  # rows matching the filters, over all pages
    offset: int
    limit: int
    classes: list[str]
    predicted: bool  # the version has a predictions table
    per_head: bool  # ... with per-head probabilities (the disagreement filter needs them)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        out.pop("notices")
        return out


@dataclass
class OverviewResult(_Result):
    info: Any  # InfoResult
    version: Optional[str]  # the active version's fingerprint
    classes: list[str]
    trained: bool
    scores: dict[str, dict] = field(default_factory=dict)  # head (and 'fused') -> validation accuracy, macro_f1...
    weights: dict[str, float] = field(default_factory=dict)
    confusion: Optional[list[list[int]]] = None  # validation: confusion[true][predicted]
    trained_classes: list[str] = field(default_factory=list)  # the confusion matrix's classes
    n_val: int = 0
    predicted: bool = False


@dataclass
class ImageDetails(_Result):
    id: str
    paths: list[str]
    split: str
    folder_label: Optional[str]
    label: Optional[str]  # now
    label_source: str  # 'folder', 'human', 'import' or 'none'
    predicted: Optional[str]
    confidence: Optional[float]
    fused: list[tuple[str, float]]  # classes by fused probability, highest first (top 10)
    heads: dict[str, list[tuple[str, float]]]  # head -> its top 3
    neighbors: list[Neighbor]
    history: list[dict]
    width: Optional[int] = None
    height: Optional[int] = None


class Reviewing:
    """The review methods of :class:`~clipfuse.workspace.Workspace`."""

    _review_lock = threading.Lock()

    # ---- the overview --------------------------------------------------------------------------------
    def overview(self, *, version: str | None = None) -> OverviewResult:
        """The store's counts, its versions and the last training's validation scores and confusion matrix."""
        import numpy as np

        from clipfuse.classify import score_predictions

        key = self.store.table_versions() if not self.store.is_empty else None
        cached = self.__dict__.get("_info_cache")
        if key is not None and cached is not None and cached[0] == key:  # info reads every image row: once per state
            info = cached[1]
            notices = self._start()
        else:
            info = self.info()
            notices = info.notices  # what follows warns into the same list
            self.__dict__["_info_cache"] = (key, info)
        if not info.versions:
            return OverviewResult(info=info, version=None, classes=self.store.classes(), trained=False,
                                  notices=notices)
        v = self.version(version)
        out = OverviewResult(info=info, version=v.fingerprint, classes=self.store.classes(), trained=False,
                             predicted=self.store.table_versions(v.fingerprint)[3] is not None, notices=notices)
        saved = self._validation(v)
        if saved is None:
            return out
        y_val, proba = saved["labels"], saved["proba"]
        scores = {h: score_predictions(y_val, P) for h, P in proba.items()}
        order = [h for h in saved["heads"] if h in scores] + ["fused"]
        n = len(saved["classes"])
        confusion = np.zeros((n, n), dtype=np.int64)
        np.add.at(confusion, (y_val, proba["fused"].argmax(1)), 1)
        out.trained, out.scores = True, {h: scores[h] for h in order}
        out.weights, out.confusion = dict(saved["weights"]), confusion.tolist()
        out.trained_classes, out.n_val = list(saved["classes"]), int(len(y_val))
        return out

    def confusion_ids(self, true: str, predicted: str, *, version: str | None = None) -> list[str]:
        """Ids of the validation images of class ``true`` that the fusion predicted as ``predicted``."""
        v = self.version(version)
        saved = self._validation(v)
        if saved is None:
            raise FileNotFoundError(f"no trained heads for version {v.short}; run `clipfuse train-heads` first.")
        classes = saved["classes"]
        for name, option in ((true, "true"), (predicted, "predicted")):
            if name not in classes:
                raise OptionError(option, f"no class {name!r} among the trained classes ({', '.join(classes[:8])}...).")
        cell = (saved["labels"] == classes.index(true)) & (saved["proba"]["fused"].argmax(1) == classes.index(predicted))
        return [str(i) for i in saved["fit_ids"][saved["rows"][cell]]]

    def _validation(self, v) -> dict | None:
        """The saved heads' validation predictions, read from their folder alone (no vectors, unlike
        ``load_trained``) and kept until the heads change: labels, proba per head and fused, rows, fit_ids,
        classes, heads, weights. None before train-heads."""
        import json

        import numpy as np
        from safetensors.numpy import load_file

        from .heads import ENSEMBLE_FILE, FIT_IDS_FILE, current_heads

        folder = current_heads(self.store, v)
        if folder is None or not (folder / ENSEMBLE_FILE).exists():
            return None
        key = (str(Path(folder).resolve()), (folder / ENSEMBLE_FILE).stat().st_mtime_ns)
        cache = self.__dict__.setdefault("_validation_cache", {})
        if cache.get(v.fingerprint, (None,))[0] == key:
            return cache[v.fingerprint][1]
        meta = json.loads((folder / ENSEMBLE_FILE).read_text())
        arrays = load_file(str(folder / "ensemble.safetensors"))
        proba = {k[len("_val."):]: v_ for k, v_ in arrays.items() if k.startswith("_val.")}
        saved = {"labels": arrays["_val_labels"], "rows": arrays["_val_rows"], "proba": proba,
                 "fit_ids": np.load(folder / FIT_IDS_FILE, allow_pickle=False), "classes": list(meta["classes"]),
                 "heads": list(meta.get("heads", {})), "weights": meta.get("weights", {})}
        cache[v.fingerprint] = (key, saved)
        return saved

    # ---- the gallery ---------------------------------------------------------------------------------
    def gallery(self, *, version: str | None = None, split: str | None = None, label: str | None = None,
                labeled: bool | None = None, predicted: str | None = None, min_confidence: float | None = None,
                max_confidence: float | None = None, disagree: bool = False, ids: list[str] | None = None,
                sort: str = "confidence", offset: int = 0, limit: int = 100) -> GalleryPage:
        """One page of the version's images, filtered and sorted on the server side.

        ``label`` is the label now (a class name), ``labeled`` keeps images with (True) or without (False)
        a label now, ``predicted`` is the fused prediction;
        ``disagree`` keeps images whose heads' top classes differ from the fused one (needs
        ``predict(per_head=True)``); ``ids`` keeps only those images. ``sort`` is one of
        ``confidence`` (lowest first), ``-confidence``, ``margin`` (least sure first), ``ood`` (most out of
        distribution first) or ``path``.
        The joined table is built once per change of the store and kept, so pages of a 300,000-image
        store are answered from memory.
        """
        import polars as pl

        notices = self._start()
        if sort not in GALLERY_SORTS:
            raise OptionError("sort", f"sort must be one of {', '.join(GALLERY_SORTS)}, got {sort!r}.")
        if offset < 0:
            raise OptionError("offset", f"offset must be 0 or more, got {offset}.")
        if not 1 <= limit <= MAX_PAGE:
            raise OptionError("limit", f"limit must be between 1 and {MAX_PAGE}, got {limit}.")
        for name, value in (("min_confidence", min_confidence), ("max_confidence", max_confidence)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(name, f"{name} must be between 0 and 1, got {value}.")
        v = self.version(version)
        by_sort, has_pred, per_head = self._review_frame(v)
        frame = by_sort.get(sort if has_pred else "path", by_sort["path"])
        classes = self.store.classes()
        if split is not None:
            if split not in ("labeled", "unlabeled", "test"):
                raise OptionError("split", f"split must be labeled, unlabeled or test, got {split!r}.")
            frame = frame.filter(pl.col("split") == split)
        if label is not None:
            frame = frame.filter(pl.col("label") == label)
        if labeled is not None:
            frame = frame.filter(pl.col("label").is_not_null() if labeled else pl.col("label").is_null())
        if not has_pred and (predicted is not None or min_confidence is not None or max_confidence is not None):
            raise OptionError("predicted", f"version {v.short} has no predictions yet; run `clipfuse predict` "
                                           "(or Retrain) first.")
        if predicted is not None:
            frame = frame.filter(pl.col("predicted") == predicted)
        if min_confidence is not None:
            frame = frame.filter(pl.col("confidence") >= min_confidence)
        if max_confidence is not None:
            frame = frame.filter(pl.col("confidence") <= max_confidence)
        if disagree:
            if not per_head:
                raise OptionError("disagree", f"the predictions of version {v.short} have no per-head probabilities; "
                                              "run `clipfuse predict --per-head` (Retrain does) first.")
            frame = frame.filter(~pl.col("heads_agree"))
        if ids is not None:
            frame = frame.filter(pl.col("id").is_in(list(ids)))
        total = frame.height
        page = frame.slice(offset, limit).to_dicts()
        rows = [GalleryRow(id=r["id"], path=r["path"], split=r["split"], label=r["label"], predicted=r["predicted"],
                           confidence=r["confidence"], margin=r["margin"], heads_agree=r["heads_agree"])
                for r in page]
        return GalleryPage(version=v.fingerprint, rows=rows, total=total, offset=offset, limit=limit, classes=classes,
                           predicted=has_pred, per_head=per_head, notices=notices)

    def _review_frame(self, v):
        """``(frame, has_predictions, per_head)``: one row per image id, cached until a table changes."""
        key = (v.fingerprint, self.store.table_versions(v.fingerprint))
        cache = self.__dict__.setdefault("_review_cache", {})
        with self._review_lock:
            if cache.get(v.fingerprint, (None,))[0] == key:
                return cache[v.fingerprint][1]
            built = self._build_review_frame(v)
            cache[v.fingerprint] = (key, built)
            return built

    def _build_review_frame(self, v):
        import numpy as np
        import polars as pl

        from clipfuse.data import SPLIT_PRIORITY

        images = pl.from_arrow(self.store.images().select(["id", "path", "split", "label", "width", "height"]))
        images = (images.with_columns(pl.col("split").replace_strict(SPLIT_PRIORITY, default=9).alias("_rank"))
                  .sort(["id", "_rank", "path"]))
        per_id = images.group_by("id", maintain_order=True).agg(
            pl.col("path").first(), pl.col("split").first(), pl.col("path").sort().alias("paths"),
            pl.col("width").first(), pl.col("height").first(),
            pl.col("label").filter(pl.col("split").is_in(["labeled", "test"])).drop_nulls().first().alias("folder"))
        history = self.store.label_history()
        if history.num_rows:
            set_now = (pl.from_arrow(history.select(["id", "label", "source"])).group_by("id", maintain_order=True)
                       .agg(pl.col("label").last().alias("set"), pl.col("source").last().alias("set_source")))
            per_id = per_id.join(set_now, on="id", how="left")
        else:
            per_id = per_id.with_columns(pl.lit(None, pl.Utf8).alias("set"), pl.lit(None, pl.Utf8).alias("set_source"))
        per_id = per_id.with_columns(
            pl.when(pl.col("set_source").is_not_null()).then(pl.col("set")).otherwise(pl.col("folder")).alias("label"))
        predictions = self.store.predictions(v.fingerprint)
        has_pred, per_head = predictions is not None and predictions.num_rows > 0, False
        if has_pred:
            P = _matrix(predictions["probs"])
            top2 = np.sort(P, axis=1)[:, -2:] if P.shape[1] > 1 else np.hstack([np.zeros((len(P), 1)), P])
            fused_top = P.argmax(1)
            head_cols = [c for c in predictions.column_names if c.startswith("probs_")]
            agree = np.ones(len(P), dtype=bool)
            for c in head_cols:
                H = _matrix(predictions[c])
                answered = ~np.isnan(H).any(axis=1)
                agree &= ~answered | (np.nan_to_num(H).argmax(1) == fused_top)
            per_head = bool(head_cols)
            pred = pl.DataFrame({"id": predictions["id"].to_pylist(), "predicted": predictions["label"].to_pylist(),
                                 "confidence": predictions["confidence"].to_numpy().astype(np.float64),
                                 "margin": (top2[:, 1] - top2[:, 0]).astype(np.float64),
                                 "ood": (predictions["ood"].to_numpy().astype(np.float64)
                                         if "ood" in predictions.column_names else np.full(len(P), np.nan)),
                                 "heads_agree": agree if per_head else [None] * len(P)},
                                schema_overrides={"heads_agree": pl.Boolean})
            pred = pred.with_columns(pl.col("ood").fill_nan(None))  # older tables and rows without a score
            per_id = per_id.join(pred, on="id", how="left")
        else:
            per_id = per_id.with_columns(pl.lit(None, pl.Utf8).alias("predicted"), pl.lit(None, pl.Float64).alias("confidence"),
                                         pl.lit(None, pl.Float64).alias("margin"),
                                         pl.lit(None, pl.Float64).alias("ood"),
                                         pl.lit(None, pl.Boolean).alias("heads_agree"))
        embedded = pl.DataFrame({"id": sorted(self.store.embedded_ids(v.fingerprint))}, schema={"id": pl.Utf8})
        per_id = per_id.join(embedded, on="id", how="semi")  # the version's images (not its error rows)
        frame = per_id.select(["id", "path", "split", "label", "predicted", "confidence", "margin", "ood",
                               "heads_agree", "paths", "folder", "set_source", "width", "height"])
        # sorted once per sort key: a page is then a filter (which keeps the order) and a slice
        by_sort = {"path": frame.sort("path")}
        if has_pred:
            by_sort["margin"] = frame.sort(["margin", "path"], nulls_last=True)
            by_sort["confidence"] = frame.sort(["confidence", "path"], nulls_last=True)
            by_sort["-confidence"] = frame.sort(["confidence", "path"], descending=[True, False], nulls_last=True)
            by_sort["ood"] = frame.sort(["ood", "path"], descending=[True, False], nulls_last=True)
        return by_sort, has_pred, per_head

    # ---- one image -----------------------------------------------------------------------------------
    def image_details(self, image_id: str, *, version: str | None = None, k: int = 12) -> ImageDetails:
        """Everything the review app shows of one image: paths, labels, probabilities, neighbours, history."""
        import numpy as np
        import polars as pl

        notices = self._start()
        image_id = _check_id(image_id)
        v = self.version(version)
        by_sort, _, _ = self._review_frame(v)
        hit = by_sort["path"].filter(pl.col("id") == image_id)
        if not hit.height:
            rows = self.store.images([image_id]).to_pylist()  # an image this version did not embed (an error row)
            if not rows:
                raise LookupError(f"no image with id {image_id!r} in the store.")
            row = {"paths": sorted(r["path"] for r in rows), "split": rows[0]["split"], "width": rows[0]["width"],
                   "height": rows[0]["height"], "folder": _folder_label(rows)}
        else:
            row = hit.row(0, named=True)
        history = [{"id": h["id"], "path": row["paths"][0], "label": h["label"], "source": h["source"],
                    "given": h["given"], "at": h["at"]} for h in self._history_of(image_id).to_pylist()]
        if history:
            label, source = history[-1]["label"], history[-1]["source"]
        else:
            label, source = row["folder"], ("folder" if row["folder"] is not None else "none")
        predicted = confidence = None
        fused, heads = [], {}
        predictions = self.store.prediction_rows([image_id], v.fingerprint)
        if predictions is not None and predictions.num_rows:
            classes = self.store.classes()
            first = predictions.slice(0, 1)
            P = _matrix(first["probs"])[0]
            names = classes[:len(P)]
            fused = [(names[i], float(P[i])) for i in np.argsort(-P)[:10]]
            predicted, confidence = first["label"][0].as_py(), float(first["confidence"][0].as_py())
            for c in first.column_names:
                if c.startswith("probs_"):
                    H = _matrix(first[c])[0]
                    if not np.isnan(H).any():
                        heads[c[len("probs_"):]] = [(names[i], float(H[i])) for i in np.argsort(-H)[:3]]
        try:
            neighbors = self.similar(image_id, k=k, version=v.fingerprint)
        except LookupError:
            neighbors = []  # not embedded in this version
        return ImageDetails(id=image_id, paths=list(row["paths"]), split=row["split"], folder_label=row["folder"],
                            label=label, label_source=source, predicted=predicted, confidence=confidence,
                            fused=fused, heads=heads, neighbors=neighbors, history=history,
                            width=row.get("width"), height=row.get("height"), notices=notices)

    def label_of(self, image_id: str) -> str | None:
        """The image's label now: the last one set by a person, else its folder's (None: no label)."""
        image_id = _check_id(image_id)
        mine = self._history_of(image_id)
        if mine.num_rows:
            return mine["label"][-1].as_py()
        rows = self.store.images([image_id]).to_pylist()
        if not rows:
            raise LookupError(f"no image with id {image_id!r} in the store.")
        return _folder_label(rows)

    def _history_of(self, image_id: str):
        """The label changes of one image, oldest first (an Arrow table)."""
        import pyarrow.compute as pc

        history = self.store.label_history()
        return history.filter(pc.equal(history["id"], image_id))

    def similar(self, image_id: str, *, k: int = 12, version: str | None = None) -> list[Neighbor]:
        """The ``k`` images nearest a stored image (itself left out), from the version's neighbour graph.

        Answered from memory (the hnswlib graph and the cached review table), with no table scan, so
        it stays fast on a 300,000-image store; :meth:`neighbors` is the general query (files, texts).
        """
        import polars as pl

        image_id = _check_id(image_id)
        if k < 1:
            raise OptionError("k", f"k must be at least 1, got {k}.")
        v = self.version(version)
        index = self.store.ann_index(v.fingerprint)
        try:
            query = index.vector(image_id)
        except KeyError:
            raise LookupError(f"image {image_id!r} has no vector in version {v.short}.") from None
        found, sims = index.search(query[None], k + 1)
        pairs = [(str(i), float(d)) for i, d in zip(found[0], sims[0]) if str(i) != image_id][:k]
        rows = self._review_frame(v)[0]["path"].filter(pl.col("id").is_in([p[0] for p in pairs]))
        by_id = {r["id"]: r for r in rows.select(["id", "paths", "label", "split"]).to_dicts()}
        return [Neighbor(rank=rank, id=id_, paths=list(by_id.get(id_, {}).get("paths") or []),
                         label=by_id.get(id_, {}).get("label"), split=by_id.get(id_, {}).get("split"),
                         similarity=round(sim, 6)) for rank, (id_, sim) in enumerate(pairs, start=1)]

    def image_file(self, image_id: str) -> tuple[bytes, str, str]:
        """``(bytes, path, media type)`` of an image of the store, read from one of its paths.

        Only a file that is still the image is returned: its content hash is the id, or (for imported
        ids that are not content hashes) its size and modification time are the ones indexed. So no
        other file is ever served under an image's name, whatever its path now points at.
        """
        from clipfuse.data import DEFAULT_MAX_FILE_BYTES, hash_bytes, read_regular_file
        from clipfuse.data.remote import is_uri, read_object

        image_id = _check_id(image_id)
        rows = self.store.images([image_id]).select(["path", "bytes", "mtime"]).to_pylist()
        if not rows:
            raise LookupError(f"no image with id {image_id!r} in the store.")
        reasons = []
        for row in sorted(rows, key=lambda r: r["path"]):
            path = row["path"]
            try:
                if is_uri(path):
                    data, size, mtime = read_object(path, max_bytes=DEFAULT_MAX_FILE_BYTES,
                                                    storage_options=self.store.folder_storage_options)
                else:
                    data, st = read_regular_file(path)
                    size, mtime = st.st_size, st.st_mtime
            except (OSError, ValueError) as e:
                reasons.append(f"{path}: {e}")
                continue
            same_file = row["bytes"] is not None and row["bytes"] == size and row["mtime"] == mtime
            if hash_bytes(data) != image_id and not (same_file and not _is_content_hash(image_id)):
                reasons.append(f"{path}: changed since it was indexed")
                continue
            media = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return data, path, media
        raise LookupError(f"image {image_id} can't be read from any of its paths ({'; '.join(reasons)}); "
                          "run `clipfuse index` again if the files moved.")

    def thumbnail(self, image_id: str, size: int = 256) -> Path:
        """A JPEG of the image, at most ``size`` pixels on its longer side, upright by its EXIF
        orientation; made once and kept beside the store (``_thumbs/``)."""
        if size not in THUMB_SIZES:
            raise OptionError("size", f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size}.")
        path = self.cached_thumbnail(image_id, size)
        if path.is_file():
            return path
        data, source, _ = self.image_file(image_id)
        from PIL import Image, ImageOps

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is much larger
                img = ImageOps.exif_transpose(img).convert("RGB")
                img.thumbnail((size, size))
                buffer = io.BytesIO()
                img.save(buffer, "JPEG", quality=85)
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file
            raise LookupError(f"image {image_id} ({source}) can't be decoded for a thumbnail: {e}") from e
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
        return path

    def cached_thumbnail(self, image_id: str, size: int = 256) -> Path:
        """Where :meth:`thumbnail` keeps the image's thumbnail (made or not yet)."""
        if size not in THUMB_SIZES:
            raise OptionError("size", f"thumbnail size must be one of {', '.join(map(str, THUMB_SIZES))}, got {size}.")
        name = hashlib.sha256(_check_id(image_id).encode()).hexdigest()[:32]  # ids of imports may hold any character
        return self._thumbs_folder() / str(size) / name[:2] / f"{name}.jpg"

    def _thumbs_folder(self) -> Path:
        """``<db>/_thumbs`` for a store on disk (when writable), else this machine's cache for the store."""
        found = self.__dict__.get("_thumbs_dir")
        if found is None:
            found = self.__dict__["_thumbs_dir"] = self._find_thumbs_folder()
        return found

    def _find_thumbs_folder(self) -> Path:
        from clipfuse.store.objectfolder import cache_root

        if self.store.is_local:
            folder = Path(self.store.uri) / "_thumbs"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                if os.access(folder, os.W_OK):
                    return folder
            except OSError:
                pass
        return cache_root() / hashlib.sha256(str(self.store.uri).encode()).hexdigest()[:16] / "_thumbs"


def _folder_label(rows: list[dict]) -> str | None:
    """The label an image's folders give it: that of its first labeled or test row that has one."""
    return next((r["label"] for r in rows if r["split"] in ("labeled", "test") and r["label"]), None)


def _is_content_hash(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _check_id(value) -> str:
    value = str(value)
    if not value or len(value) > 256 or any(ord(c) < 32 for c in value):
        raise LookupError(f"{value[:40]!r} is not an image id.")
    return value


def _matrix(column):
    """A fixed-size-list column as an (n, k) float array, NaN in null rows."""
    import numpy as np
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    k = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    if arr.null_count:  # flatten() drops null rows' values: put NaN rows back
        out = np.full((len(arr), k), np.nan)
        valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False))
        out[valid] = values.reshape(-1, k)
        return out
    return values.reshape(-1, k)
