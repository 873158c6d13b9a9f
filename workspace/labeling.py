"""Labels set by people: ``clipfuse label``, over the labels the folders give.

A label set here wins over the image's folder for training (the folder stays as it is); every change
is kept in the store's labels table, so the history can be shown and nothing is lost.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .results import LabelChange, LabelResult, OptionError, SuggestResult, Suggestion, Suspect, SuspectsResult

MAX_CLASS_NAME = 200


def check_class_name(name: str, where: str = "") -> str:
    """A class name as stored: the given text stripped of surrounding spaces; refused when unusable."""
    if not isinstance(name, str):
        raise ValueError(f"class name {name!r}{where} is not text.")
    cleaned = unicodedata.normalize("NFC", name).strip()  # "café" typed two ways is one class
    if not cleaned:
        raise ValueError(f"empty class name{where}; give the class's name.")
    if len(cleaned) > MAX_CLASS_NAME:
        raise ValueError(f"class name {cleaned[:40]!r}...{where} is longer than {MAX_CLASS_NAME} characters.")
    bad = [c for c in cleaned if unicodedata.category(c).startswith("C")]
    if bad:
        raise ValueError(f"class name {cleaned!r}{where} holds control characters ({bad[0]!r}); use plain text.")
    if "/" in cleaned or "\\" in cleaned or cleaned in (".", ".."):
        raise ValueError(f"class name {cleaned!r}{where} can't be a folder name (it has a slash, or is . or ..); "
                         "class names double as folder names, so pick another.")
    return cleaned


class Labeling:
    """The labeling methods of :class:`~clipfuse.workspace.Workspace`."""

    def _image_lookup(self):
        """``resolve(given) -> (id, path)`` over the store's images: an id, a stored path, or a path on disk."""
        images = self.store.images().select(["id", "path", "split"]).to_pylist()
        by_id = {}
        for r in images:
            by_id.setdefault(r["id"], r["path"])
        by_path = {r["path"]: r["id"] for r in images}
        not_test = {r["id"] for r in images if r["split"] != "test"}

        def resolve(given: str) -> tuple[str, str] | None:
            given = str(given).strip()
            if given in by_id:
                return given, by_id[given]
            if given in by_path:
                return by_path[given], given
            if "://" not in given:
                absolute = str(Path(given).expanduser().absolute())
                if absolute in by_path:
                    return by_path[absolute], absolute
                real = os.path.realpath(given)
                if real in by_path:
                    return by_path[real], real
            return None

        resolve.test_only = {r["id"] for r in images} - not_test
        return resolve

    def label(self, image=None, label: str | None = None, *, from_csv=None, remove: bool = False) -> LabelResult:
        """Set (or with ``remove=True``, take away) the label of an image, or of every row of a CSV.

        ``image`` is an image id or a path the store holds; ``from_csv`` is a CSV with a column ``id``
        or ``path`` and a column ``label`` (an empty label takes the image's label away). A new class
        name grows the class list. Everything is checked first: one bad row and nothing is written.
        """
        notices = self._start()
        self._require_store()
        if (image is None) == (from_csv is None):
            raise OptionError("ID_OR_PATH", "give either an ID_OR_PATH (with a CLASS, or --remove) or --from-csv FILE.")
        if from_csv is not None and remove:
            raise OptionError("--remove", "takes an ID_OR_PATH; in a CSV, leave the label empty to remove it.")
        if image is not None:
            if remove and label is not None:
                raise OptionError("CLASS", "--remove takes no CLASS: it takes the image's label away.")
            if not remove and label is None:
                raise OptionError("CLASS", "give the CLASS to label the image with (or --remove).")
            wanted = [(str(image), None if remove else label, "argument", None)]
        else:
            wanted = self._read_label_csv(from_csv)
        resolve = self._image_lookup()
        current, sources = self._current_labels(), self.store.labels()
        problems, changes, seen, skipped = [], [], {}, 0
        for given, name, where, also in wanted:
            if ": " in where:  # a row the reader refused
                problems.append(where)
                continue
            if not given:
                problems.append(f"{where}: no id or path")
                continue
            found = resolve(given)
            if found is None:
                problems.append(f"{where}: no image {given!r} in the store (give an image id or a path it holds; "
                                "`clipfuse neighbors` and the export show both)")
                continue
            id_, path = found
            if also is not None:
                other = resolve(also)
                if other is None or other[0] != id_:
                    problems.append(f"{where}: its id {given!r} and its path {also!r} name different images; "
                                    "fix one, or drop the path column")
                    continue
            if name is not None:
                try:
                    name = check_class_name(name, f" ({where})")
                except ValueError as e:
                    problems.append(str(e))
                    continue
            if id_ in seen and seen[id_] != name:
                shown = [repr(v) if v is not None else "(no label)" for v in (seen[id_], name)]
                problems.append(f"{where}: image {given!r} (id {id_}) is labeled twice, {shown[0]} and {shown[1]}; "
                                "keep one row per image.")
                continue
            seen[id_] = name
            if id_ in sources and sources[id_] == (name, "human"):
                skipped += 1  # already set by hand to exactly this: no new history row
                continue
            changes.append(LabelChange(id=id_, path=path, before=current.get(id_), after=name, given=given,
                                       split="test" if id_ in resolve.test_only else None))
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise ValueError(f"nothing was labeled: {len(problems)} problem(s): " + "; ".join(problems[:10]) + more)
        unique = list({c.id: c for c in changes}.values())
        with self.store.writer("clipfuse label"):
            classes = self.store.classes()
            new = sorted({c.after for c in unique if c.after is not None and c.after not in classes})
            if new:
                self.store.add_classes(new)
            self.store.add_labels([(c.id, c.after, c.given) for c in unique], source="human")
        return LabelResult(changes=unique, new_classes=new, unchanged=skipped, notices=notices)

    def _current_labels(self) -> dict[str, str | None]:
        """Each image's label now: set by a person, else its folder's."""
        out = {}
        for r in self.store.images().select(["id", "split", "label"]).to_pylist():
            if r["split"] in ("labeled", "test") and r["label"] is not None:
                out.setdefault(r["id"], r["label"])
        for id_, (label, _) in self.store.labels().items():
            out[id_] = label
        return out

    @staticmethod
    def _read_label_csv(path) -> list[tuple[str, str | None, str, str | None]]:
        """``(given, label or None, where, path given too)`` per row that says something; blank rows skipped.

        A row with an empty label says nothing (the CSV ``suggest --csv`` writes has every label
        empty until filled in); a ``remove`` column (true/yes/1/x) takes a label away.
        """
        import re

        import polars as pl

        path = Path(path)
        if not path.is_file():
            raise OptionError("--from-csv", f"{str(path)!r} is not a file; give a CSV with columns id (or path) and "
                                            "label.")
        try:
            df = pl.read_csv(path, infer_schema=False)  # every column as text: ids like 0012 stay as they are
        except Exception as e:
            text = str(e)
            if "utf-8" in text.lower() or "utf8" in text.lower():
                raise OptionError("--from-csv", f"{str(path)!r} is not UTF-8 text; save it as UTF-8 (\"CSV UTF-8\" "
                                                "in spreadsheet programs).") from e
            if "ragged" in text or "more fields" in text:
                raise OptionError("--from-csv", f"{str(path)!r} has a row with more fields than its header; quote "
                                                "fields that hold commas.") from e
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            raise OptionError("--from-csv", f"{str(path)!r} is not a readable CSV: {first}") from e
        names: dict[str, list[str]] = {}
        for c in df.columns:
            names.setdefault(re.sub(r"_duplicated_\d+$", "", c.strip().lower()), []).append(c)
        twice = [v for k, v in names.items() if k in ("id", "path", "label", "remove") and len(v) > 1]
        if twice:
            raise OptionError("--from-csv", f"{str(path)!r} has the column {twice[0][0].strip()!r} more than once "
                                            f"({', '.join(repr(c) for c in twice[0])}); keep one.")
        columns = {k: v[0] for k, v in names.items()}
        if ("id" not in columns and "path" not in columns) or "label" not in columns:
            raise OptionError("--from-csv", f"{str(path)!r} has columns {df.columns}; it needs an id (or path) column "
                                            "and a label column.")
        if df.height == 0:
            raise OptionError("--from-csv", f"{str(path)!r} has no rows.")

        def column(name):
            return df[columns[name]].to_list() if name in columns else [None] * df.height

        def blank(v):
            return v is None or not str(v).strip()

        out = []
        for i, (id_, given_path, label, remove) in enumerate(
                zip(column("id"), column("path"), column("label"), column("remove")), start=1):
            where = f"row {i}"
            removing = not blank(remove) and str(remove).strip().lower() in ("1", "true", "yes", "x", "y")
            if not blank(remove) and not removing and str(remove).strip().lower() not in ("0", "false", "no", "n"):
                out.append(("", None, f"{where}: remove must be true or false, got {remove!r}", None))
                continue
            if blank(label) and not removing:
                continue  # nothing said about this image
            if removing and not blank(label):
                out.append(("", None, f"{where}: gives the label {label!r} and remove; give one", None))
                continue
            key = id_ if not blank(id_) else given_path
            also = str(given_path) if not blank(id_) and not blank(given_path) else None
            out.append(("" if blank(key) else str(key), None if removing else str(label), where, also))
        return out

    def label_history(self, image=None) -> list[dict]:
        """Every label change (of one image, when given), oldest first: id, path, label, source, given, at."""
        self._require_store()
        history = self.store.label_history().to_pylist()
        resolve = self._image_lookup()
        if image is not None:
            found = resolve(image)
            if found is None:
                raise OptionError("ID_OR_PATH", f"no image {str(image)!r} in the store.")
            history = [h for h in history if h["id"] == found[0]]
        path_of = self._first_paths()
        return [{"id": h["id"], "path": path_of.get(h["id"]), "label": h["label"], "source": h["source"],
                 "given": h["given"], "at": h["at"]} for h in history]

    def suspects(self, *, n: int = 50, version: str | None = None, duplicate_threshold: float = 0.98) -> SuspectsResult:
        """Labeled images whose label is probably wrong, most suspect first, after ``train_heads``.

        Each labeled image is judged by heads that never saw its label (the stack's out-of-fold and
        held-out predictions), through cleanlab's ``find_label_issues``. Also reported: one content (or
        near-duplicates at cosine ≥ ``duplicate_threshold``) under two labels, and test images that
        duplicate labeled ones (a leak: the test score then measures memory).
        """
        import numpy as np

        from clipfuse.classify.quality import near_duplicates, rank_label_issues

        notices, v, trained = self._trained_for_review(n, duplicate_threshold, version)
        held = trained.ensemble.held_out_proba()
        if held is None:
            raise ValueError(f"the heads of version {v.short} were trained before clipfuse kept their out-of-fold "
                             "predictions; run `clipfuse train-heads` again.")
        rows, given, P = held
        classes = trained.classes
        ids = [str(trained.fit_ids[r]) for r in rows]
        order, score, flagged = rank_label_issues(given, P)
        path_of, label_now = self._first_paths(), self._current_labels()
        changed = sum(1 for id_, g in zip(ids, given) if label_now.get(id_) != classes[g])
        if changed:
            self._warn(f"{changed} label(s) changed since train-heads; run `clipfuse train-heads` to judge them as "
                       "they are now")
        found = [Suspect(id=ids[i], path=path_of.get(ids[i], f"id:{ids[i]}"), given=classes[given[i]],
                         suggested=classes[int(P[i].argmax())], score=float(s), flagged=bool(f),
                         reason=(f"cleanlab flags it as a label issue (held-out p(given) {1 - float(s):.2f})" if f
                                 else f"held-out p(given) {1 - float(s):.2f}; cleanlab does not flag it"))
                 for i, s, f in zip(order[:n], score[:n], flagged[:n])]

        es = trained.es
        labeled = np.flatnonzero(es.labels >= 0)
        conflicts = []
        for id_ in es.conflicts:  # one content filed under two class folders
            rows = self.store.images([id_]).select(["path", "split", "label"]).to_pylist()
            conflicts.append({"ids": [id_], "paths": sorted(r["path"] for r in rows),
                              "labels": sorted({r["label"] for r in rows if r["split"] == "labeled" and r["label"]}),
                              "cosine": 1.0})
        for i, j, cos in near_duplicates(es.X[labeled], threshold=duplicate_threshold):
            a, b = labeled[i], labeled[j]
            if es.labels[a] != es.labels[b]:
                conflicts.append({"ids": [str(es.ids[a]), str(es.ids[b])],
                                  "paths": [path_of.get(str(es.ids[a])), path_of.get(str(es.ids[b]))],
                                  "labels": [es.classes[es.labels[a]], es.classes[es.labels[b]]], "cosine": cos})
        test = np.flatnonzero(es.splits == "test")
        leaks = [{"test_id": i, "test_path": p, "labeled_id": i, "labeled_path": q, "cosine": 1.0}
                 for i, p, q in self._exact_test_leaks()]
        for i, j, cos in near_duplicates(es.X[test], es.X[labeled], threshold=duplicate_threshold):
            t, lab = test[i], labeled[j]
            leaks.append({"test_id": str(es.ids[t]), "test_path": path_of.get(str(es.ids[t])),
                          "labeled_id": str(es.ids[lab]), "labeled_path": path_of.get(str(es.ids[lab])),
                          "cosine": cos})
        return SuspectsResult(version=v.fingerprint, suspects=found, flagged=int(flagged.sum()),
                              judged=len(ids), conflicts=conflicts, leaks=leaks, notices=notices)

    def _trained_for_review(self, n: int, duplicate_threshold: float, version: str | None):
        """``(notices, version, trained heads)`` for suspects and suggest, after checking their options."""
        from .heads import load_trained

        notices = self._start()
        if n < 1:
            raise OptionError("-n", f"must be at least 1, got {n}.")
        if not 0.0 < duplicate_threshold <= 1.0:  # NaN fails this too
            raise OptionError("--duplicate-threshold", f"must be in (0, 1], got {duplicate_threshold}.")
        v = self.version(version)
        return notices, v, load_trained(self.store, v, notify=self._notify)

    def _first_paths(self) -> dict[str, str]:
        """The first path the store holds for each image id."""
        path_of = {}
        for r in self.store.images().select(["id", "path"]).to_pylist():
            path_of.setdefault(r["id"], r["path"])
        return path_of

    def _exact_test_leaks(self) -> list[tuple[str, str, str]]:
        """(id, test path, labeled path) of contents that are both a test image and a labeled one."""
        test, labeled = {}, {}
        for r in self.store.images().select(["id", "path", "split"]).to_pylist():
            if r["split"] == "test":
                test.setdefault(r["id"], r["path"])
            elif r["split"] == "labeled":
                labeled.setdefault(r["id"], r["path"])
        return [(i, test[i], labeled[i]) for i in sorted(set(test) & set(labeled))]

    def suggest(self, *, n: int = 100, version: str | None = None, seed: int = 0,
                duplicate_threshold: float = 0.98) -> SuggestResult:
        """The images to label next (after ``train_heads``), best first, each with why it was chosen.

        Unlabeled, non-test images are ranked by the fused margin, the heads' disagreement and how few
        labels their part of the embedding space has; a batch spans the space (k-means groups), is
        balanced over the predicted classes and holds no two near-duplicates (see
        :func:`clipfuse.classify.quality.suggest_batch`).
        """
        import numpy as np

        from clipfuse.classify.quality import suggest_batch

        notices, v, trained = self._trained_for_review(n, duplicate_threshold, version)
        es = trained.es
        fused, per_head = trained.predict()
        candidates = np.flatnonzero((es.labels < 0) & (es.splits != "test"))
        if not len(candidates):
            raise ValueError("every image is labeled or a test image: nothing is left to suggest.")
        picks = suggest_batch(fused, per_head, es.X, es.labels, candidates, n, seed=seed,
                              duplicate_threshold=duplicate_threshold)
        path_of = self._first_paths()  # the labels are not needed here: one read of the images table
        classes = trained.classes
        rows = [Suggestion(id=str(es.ids[p["row"]]), path=path_of.get(str(es.ids[p["row"]]), f"id:{es.ids[p['row']]}"),
                           predicted=classes[p["predicted"]], confidence=float(fused[p["row"]].max()),
                           priority=p["priority"], reason=p["reason"]) for p in picks]
        return SuggestResult(version=v.fingerprint, suggestions=rows, candidates=len(candidates), notices=notices)
