"""Finetune, WiSE-FT and re-embed: the workflows that make new models and the versions they embed."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .models import check_decode, check_device, load_embedder, publish_model_folder, version_embedder
from .results import FinetuneResult, IndexResult, Notice, OptionError, Progress, WiseFtResult

MIB = 2**20


class Tuning:
    """The model-making methods of :class:`~clipfuse.workspace.Workspace` (they need torch)."""

    @staticmethod
    def _labeled_items(images: list[dict], es, rows) -> list[tuple[str, int]]:
        """(path, class index) of embedding rows, using one labeled path per image id."""
        path_of = {}
        for r in images:
            if r["split"] == "labeled" or r["id"] not in path_of:
                path_of[r["id"]] = r["path"]
        return [(path_of[es.ids[i]], int(es.labels[i])) for i in rows]

    def _refuse_model_folder_in_use(self, out: Path) -> None:
        """A model folder that made one of the store's versions must not be overwritten, nor a folder of
        other files."""
        from clipfuse.train import check_model_folder_target

        check_model_folder_target(out)
        target = out.resolve()
        used = [v.short for v in self.store.versions() if v.model_name.folder == target]
        if used:
            raise FileExistsError(f"{str(out)!r} holds the model of embedding version {used[0]}; overwriting it "
                                  "would orphan that version. Choose another --out.")

    def pseudo_labels(self, version, *, per_class: int, min_confidence: float = 0.9) -> list[tuple[str, int]]:
        """(path, class index) of the most confident unlabeled predictions, at most ``per_class`` per
        predicted class: the pick :class:`clipfuse.classify.PseudoLabelHead` makes each round."""
        import numpy as np

        from clipfuse.classify import select_pseudo_labels

        v = self.version(version)
        predictions = self.store.predictions(v.fingerprint)
        if predictions is None:
            raise LookupError("--pseudo-labels needs predictions: run `clipfuse train-heads` and `clipfuse predict` "
                              "first.")
        path_of = {}
        for r in self.store.images().select(["id", "path", "split"]).to_pylist():
            if r["split"] == "unlabeled":
                path_of.setdefault(r["id"], r["path"])
        t = predictions.select(["id", "split", "label_index", "confidence"]).to_pydict()
        rows = [i for i, (id_, split) in enumerate(zip(t["id"], t["split"])) if split == "unlabeled" and id_ in path_of]
        pred = np.asarray(t["label_index"], dtype=np.int64)[rows]
        confidence = np.asarray(t["confidence"], dtype=np.float64)[rows]
        n_classes = predictions.schema.field("probs").type.list_size
        picked, labels = select_pseudo_labels(pred, confidence, per_class, min_confidence=min_confidence,
                                              n_classes=n_classes)
        return [(path_of[t["id"][rows[i]]], int(c)) for i, c in zip(picked, labels)]

    def finetune(self, *, version: str | None = None, out="clipfuse-models/finetuned", epochs: int = 10,
                 lr: float = 1e-5, wd: float = 0.01, batch_size: int = 32, augment: bool = False,
                 train_text: bool = False, freeze_backbone: bool = False, mean_teacher: bool = False,
                 class_words=None, patience: int = 3, seed: int = 0, pseudo_labels: int = 0,
                 pseudo_min_confidence: float = 0.9, device: str = "auto",
                 progress: Progress | None = None) -> FinetuneResult:
        """Finetune the version's image tower on the labeled images (the seeded 80/20 split of train-heads).

        The result is a model folder ``out`` for :meth:`wise_ft` and :meth:`reembed`.
        ``progress`` gets ``("epoch e/E  loss ... val acc ...", step, steps)``.
        """
        from clipfuse.data import split_labeled
        from clipfuse.embed import DEFAULT_TEMPLATES, build_prompts, class_text_embeddings
        from clipfuse.train import FinetuneConfig, model_config, save_model_folder
        from clipfuse.train import finetune as run_finetune

        from . import heads as _heads

        notices = self._start()
        out = Path(out)
        config = FinetuneConfig(epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size, augment=augment,
                                train_text=train_text, freeze_backbone=freeze_backbone, patience=patience,
                                mean_teacher=mean_teacher, seed=seed)
        check_device(device)
        v = self.version(version)
        if v.imported:
            raise ValueError(f"version {v.short} was imported without a model; finetuning needs one. "
                             "Re-import with --model, or index the images with a model.")
        if train_text and v.image_only:
            raise OptionError("--train-text", f"--train-text needs a CLIP model; {v.model} is an image-only backbone.")
        self._refuse_model_folder_in_use(out)
        es = self.store.load_embeddings(v.fingerprint)
        _heads.require_labels(self.store, v, es)
        train_idx, val_idx = split_labeled(es.labels, val_fraction=0.2, seed=seed)
        if not len(val_idx):
            raise ValueError(f"every class has a single labeled image ({len(train_idx)} labels), so none can be "
                             "held out to pick the finetuned epoch; label at least two images of some classes "
                             "(`clipfuse train-heads` works with one label per class).")
        images = self.store.images().select(["id", "path", "split"]).to_pylist()  # read once for the three lists
        train, val = self._labeled_items(images, es, train_idx), self._labeled_items(images, es, val_idx)
        n_pseudo = 0
        if pseudo_labels:
            pseudo = self.pseudo_labels(v, per_class=pseudo_labels, min_confidence=pseudo_min_confidence)
            self._warn(f"adding {len(pseudo)} pseudo-labeled images (at most {pseudo_labels} per class, "
                       f"confidence >= {pseudo_min_confidence})")
            train, n_pseudo = train + pseudo, len(pseudo)
        words = _heads.class_words(class_words, es.classes, notify=self._notify)
        embedder = version_embedder(v, None, device, notify=self._notify, progress=progress, store=self.store,
                                    trainable=True)  # an int8 version's fp32 weights
        folder_config = model_config(v.model, embedder.model)  # fails now rather than after training
        text = class_text_embeddings(embedder, es.classes, words) if embedder.has_text else None
        unlabeled = [r["path"] for r in images if r["split"] == "unlabeled"]
        prompts = [build_prompts(words[c], DEFAULT_TEMPLATES) for c in es.classes] if embedder.has_text else None

        def report(epoch, step, steps, loss, val_acc):
            if progress is not None:
                status = f"loss {loss:.4f}" + ("" if val_acc is None else f"  val acc {val_acc:.3f}")
                progress(f"epoch {epoch}/{epochs}  {status}", step, steps)

        result = run_finetune(embedder, train, val, text, config, n_classes=len(es.classes), unlabeled=unlabeled,
                              prompts=prompts, progress=report)
        meta = {"kind": "finetuned", "base_model": v.model, "base_pretrained": v.pretrained,
                "base_fingerprint": embedder.fingerprint, "base_random_weights": v.random_weights,
                "base_decode": v.decode, "base_version": v.fingerprint,
                "classes": es.classes, "class_words": words, "config": dataclasses.asdict(config),
                "history": result.history, "start": result.start_name, "start_accuracy": result.start_accuracy,
                "best_epoch": result.best_epoch, "val_ids": [str(es.ids[i]) for i in val_idx],
                "val_labels": [int(es.labels[i]) for i in val_idx], "train_images": len(train),
                "pseudo_labels": pseudo_labels, "pseudo_min_confidence": pseudo_min_confidence}
        save_model_folder(out, embedder.model, folder_config, heads={"finetuned": result.head, "start": result.start},
                          meta=meta, tokenizer=embedder.tokenizer)
        best = max([result.start_accuracy] + [h["val_accuracy"] for h in result.history])
        return FinetuneResult(out=out, version=v.fingerprint, train_images=len(train), pseudo_labels=n_pseudo,
                              start_name=result.start_name, start_accuracy=result.start_accuracy,
                              best_accuracy=best, best_epoch=result.best_epoch, history=result.history,
                              notices=notices)

    def wise_ft(self, checkpoint, *, alphas: str = "0:1:0.1", out=None, device: str = "auto",
                progress: Progress | None = None) -> WiseFtResult:
        """WiSE-FT: interpolate the starting and the finetuned weights, keep the best alpha on validation.

        ``alphas`` is ``start:stop:step`` or a comma list; the chosen model goes to ``out``
        (default ``<checkpoint>-wiseft``) with ``alpha_curve.png``.
        """
        import torch

        from clipfuse.embed import EmbedderConfig
        from clipfuse.train import (encode, load_state, model_config, parse_alphas, plot_alpha_curve,
                                    read_model_folder, save_model_folder, sweep)

        notices = self._start()
        checkpoint = Path(checkpoint)
        try:
            grid = parse_alphas(alphas)
        except ValueError as e:
            raise OptionError("--alphas", str(e)) from e
        check_device(device)
        if not checkpoint.is_dir():
            raise OptionError("--checkpoint", f"{str(checkpoint)!r} is not a folder; pass the folder "
                                              "`clipfuse finetune` wrote.")
        meta, heads = read_model_folder(checkpoint)
        if meta.get("kind") != "finetuned":
            raise ValueError(f"{str(checkpoint)!r} holds a {meta.get('kind')} model; pass a `clipfuse finetune` "
                             "folder.")
        out = Path(out) if out is not None else checkpoint.with_name(checkpoint.name + "-wiseft")
        embedder = load_embedder(EmbedderConfig(model=meta["base_model"], pretrained=meta["base_pretrained"],
                                                device=device, random_weights=meta["base_random_weights"],
                                                decode=meta.get("base_decode", "full")),
                                 notify=self._notify, progress=progress)
        if embedder.fingerprint != meta["base_fingerprint"]:
            raise ValueError(f"model {meta['base_model']!r} no longer loads as the model that was finetuned "
                             f"(fingerprint {embedder.fingerprint[:12]}, expected {meta['base_fingerprint'][:12]}).")
        base_state = {k: t.detach().cpu().clone() for k, t in embedder.model.state_dict().items()}
        finetuned_state = load_state(checkpoint)  # CPU tensors; load_state_dict moves them to the model's device
        self._require_store()
        self._refuse_model_folder_in_use(out)
        paths = {r["id"]: r["path"] for r in self.store.images().select(["id", "path"]).to_pylist()}
        val_ids, val_labels, images = [], [], []
        for id_, label in zip(meta["val_ids"], meta["val_labels"]):
            img = embedder.read_image(paths[id_])[1] if id_ in paths else None  # decoded as the base version
            if img is not None:  # deleted or unreadable since finetuning: skipped
                val_ids.append(id_)
                val_labels.append(label)
                images.append(img)
        if not val_ids:
            raise ValueError(f"none of the {len(meta['val_ids'])} validation images of {checkpoint} can be read "
                             f"from {self.db}; run wise-ft against the store the model was finetuned on.")
        labels = torch.tensor(val_labels)
        pixels = torch.stack([embedder.preprocess(img) for img in images])
        stored = None
        if meta["base_fingerprint"] in {v.fingerprint for v in self.store.versions()}:
            try:
                stored = self.store.vectors_for(val_ids, meta["base_fingerprint"])
            except KeyError:
                stored = None  # some were never embedded by the base model: encode them all

        def val_features(alpha, model):
            if progress is not None:
                progress(f"alpha {alpha:g}", grid.index(alpha) if alpha in grid else 0, len(grid))
            if alpha == 0.0 and stored is not None:
                return stored  # the base model made the store's vectors: no need to re-encode
            return encode(model, pixels, device=embedder.device)

        result = sweep(embedder.model, base_state, finetuned_state, heads["start"], heads["finetuned"], grid,
                       val_features, labels)
        if progress is not None:
            progress("alphas swept", len(grid), len(grid))
        save_model_folder(out, embedder.model, model_config(meta["base_model"], embedder.model),
                          heads={"finetuned": result["head"], "start": heads["start"]},
                          tokenizer=embedder.tokenizer,
                          meta={**meta, "kind": "wise-ft", "alpha": result["best_alpha"],
                                "alpha_curve": dict(zip(map(str, result["alphas"]), result["accuracies"]))})
        start_name = meta.get("start", "zero-shot")
        curve = plot_alpha_curve(result["alphas"], result["accuracies"], out / "alpha_curve.png",
                                 best_alpha=result["best_alpha"], start_name=start_name)
        return WiseFtResult(out=out, alphas=list(result["alphas"]), accuracies=list(result["accuracies"]),
                            best_alpha=result["best_alpha"], best_accuracy=result["best_accuracy"],
                            start_name=start_name, val_images=len(val_ids), curve=Path(curve), notices=notices)

    def reembed(self, model_checkpoint, *, device: str = "auto", precision: str | None = None,
                decode: str | None = None, batch_size: int = 32, workers: int | None = None,
                commit_every: int = 512, max_file_size: int = 512, progress: Progress | None = None) -> IndexResult:
        """Embed every image of the store with a finetuned model folder, as a new embedding version.

        The previous version stays active until the new one is complete; a killed run resumes.
        ``precision`` / ``decode`` default to the active version's (int8 stays int8, fp16 / bf16 are asked
        for each run).
        """
        from clipfuse.data import ImageFile, ImageFolders
        from clipfuse.data.remote import is_uri, listed_objects
        from clipfuse.embed import EmbedderConfig
        from clipfuse.train import model_name_of, read_model_folder

        notices = self._start()
        model_checkpoint = Path(model_checkpoint)
        if not model_checkpoint.is_dir():
            raise OptionError("--model-checkpoint", f"{str(model_checkpoint)!r} is not a folder; pass a model "
                                                    "folder from `clipfuse finetune` or `wise-ft`.")
        meta = read_model_folder(model_checkpoint)[0]  # fails clearly on a folder that isn't one
        check_decode(decode)
        active_version = self.version()
        active = active_version.fingerprint
        precision = precision or active_version.precision  # a version records fp32 or int8
        check_device(device, precision)
        embedder = load_embedder(EmbedderConfig(model=model_name_of(model_checkpoint), device=device,
                                                precision=precision, decode=decode or active_version.decode,
                                                batch_size=batch_size, workers=workers,
                                                max_file_bytes=max_file_size * MIB),
                                 notify=self._notify, progress=progress)
        if publish_model_folder(self.store, embedder.fingerprint, model_checkpoint):
            self._notify(Notice(f"kept a copy of the model folder beside the store ({self.store.uri}/_models/"
                                f"{embedder.fingerprint}): other machines load this version's model from it",
                                kind="model-copy"))
        # the version this one replaces: the active one, or (re-running a finished reembed) the one it came from
        previous = active if active != embedder.fingerprint else meta.get("base_version", meta.get("base_fingerprint"))
        with self.store.writer("clipfuse reembed"):  # the rows read are the rows re-embedded, whoever wrote before
            rows = self.store.images().select(["path", "split", "label"]).to_pylist()
            # only files that exist: rows of imported vectors ("id:..." paths) or of files gone since indexing
            # have nothing to embed, and must not be dropped from the image table the old version still uses
            listed = listed_objects([r["path"] for r in rows], self.store.folder_storage_options)
            files = [ImageFile(r["path"], r["split"], r["label"], *listed[r["path"]]) if r["path"] in listed
                     else ImageFile(r["path"], r["split"], r["label"]) for r in rows
                     if r["path"] in listed or not is_uri(r["path"]) and os.path.isfile(r["path"])]
            if len(files) < len(rows):
                self._warn(f"{len(rows) - len(files)} image row(s) have no file on disk and are not re-embedded "
                           "(imported vectors or moved files).")
            summary = self._run_index(embedder, ImageFolders(files, self.store.classes(), []),
                                      commit_every=commit_every, progress=progress)
        return IndexResult(db=str(self.db), summary=summary, model=embedder.config.model,
                           random_weights=embedder.info.random_weights, missing_files=len(rows) - len(files),
                           previous=previous if previous and previous != summary.fingerprint else None,
                           notices=notices)
