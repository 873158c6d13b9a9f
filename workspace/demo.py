"""The demo: the whole job on a real sample (sklearn's handwritten digits as PNG files)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from .results import DemoResult, Notice, Progress


def _fallback_reason(e: Exception) -> str:
    cause = str(e.__cause__ or e).splitlines()[0]
    return cause.split(": ")[0] if len(cause) > 90 else cause  # the first clause says enough


def run_demo(workdir="clipfuse-demo", *, model: str = "ViT-B-32", pretrained: str | None = None,
             unlabeled: int | None = None, device: str = "auto", batch_size: int = 32, k: int = 5,
             finetune: bool = False, on_notice=None, progress: Progress | None = None) -> DemoResult:
    """Write 15 labeled digits per class and the rest unlabeled into ``workdir``, index them, find the
    neighbours of an unlabeled image, train every head and the fusion, score them against the true
    classes of the unlabeled images and export ``predictions.csv``; with ``finetune``, then
    finetune, WiSE-FT, re-embed and train again.

    Uses the pretrained CLIP model when its weights load; otherwise effnet-lite0 (ImageNet weights
    that ship with clipfuse), with a notice. Never random weights.
    """
    from clipfuse.data import write_digits_dataset
    from clipfuse.embed import EFFNET_LITE0, PretrainedWeightsError, default_pretrained

    from .workspace import Workspace

    workdir = Path(workdir)
    paths = write_digits_dataset(workdir, max_unlabeled=unlabeled)
    db = workdir / "clipfuse.lance"
    notices: list[Notice] = []  # everything the steps raised, in order

    def notify(notice: Notice) -> None:
        notices.append(notice)
        if on_notice is not None:
            on_notice(notice)

    ws = Workspace(db, on_notice=notify)
    fallback = None
    try:
        indexed = ws.index(paths["labeled"], unlabeled=paths["unlabeled"], model=model, pretrained=pretrained,
                           device=device, batch_size=batch_size, progress=progress)
    except PretrainedWeightsError as e:
        tag = pretrained or default_pretrained(model)
        fallback = (f"{model}{f' ({tag})' if tag else ''} can't be loaded here ({_fallback_reason(e)}); using "
                    f"{EFFNET_LITE0} instead: ImageNet EfficientNet-Lite0, bundled with clipfuse, image-only "
                    "(no zero-shot head).")
        notify(Notice(fallback))
        indexed = ws.index(paths["labeled"], unlabeled=paths["unlabeled"], model=EFFNET_LITE0, device=device,
                           batch_size=batch_size, progress=progress)
    with open(paths["truth"], newline="", encoding="utf-8") as f:
        truth = {row["path"]: row["label"] for row in csv.DictReader(f)}
    query = sorted(truth)[0]
    found = ws.neighbors(query, k=k + 1, version=indexed.fingerprint)
    # the query itself comes first: left out, the others ranked from 1
    found.neighbors = [dataclasses.replace(n, rank=n.rank - 1) for n in found.neighbors[1:]]
    neighbor_classes = [n.label or truth.get(n.paths[0] if n.paths else "", "?") for n in found.neighbors]

    trainings, accuracies = [], []
    scored = _train_and_score(ws, indexed.fingerprint, truth, trainings, accuracies, progress, notify)
    exported = ws.export(workdir / "predictions.csv", version=indexed.fingerprint, force=True)
    result = DemoResult(workdir=workdir, db=db, model=indexed.model, index=indexed, query=query,
                        query_class=truth[query], neighbors=found, neighbor_classes=neighbor_classes,
                        training=trainings, unlabeled_accuracy=accuracies, unlabeled_scored=scored,
                        exported=exported, fallback=fallback, notices=notices)
    if finetune:
        models = workdir / "models"
        result.finetune = ws.finetune(out=models / "ft", epochs=3, lr=1e-5, batch_size=batch_size, device=device,
                                      progress=progress)
        result.wise_ft = ws.wise_ft(models / "ft", alphas="0:1:0.25", out=models / "ft-wiseft", device=device,
                                    progress=progress)
        result.reembed = ws.reembed(models / "ft-wiseft", device=device, batch_size=batch_size, progress=progress)
        _train_and_score(ws, result.reembed.fingerprint, truth, trainings, accuracies, progress, notify)
        result.exported = ws.export(workdir / "predictions.csv", version=result.reembed.fingerprint, force=True)
    return result


def _train_and_score(ws, fingerprint: str, truth: dict, trainings: list, accuracies: list, progress, notify) -> int:
    """train-heads -> predict -> accuracy of each head on the demo's unlabeled images (whose true
    classes the sample knows); returns how many were scored."""
    from . import heads as _heads

    trainings.append(ws.train_heads(version=fingerprint, progress=progress))
    version = ws.version(fingerprint)
    trained = _heads.load_trained(ws.store, version, notify=notify)
    es = trained.es
    # every row is a fitted row here: heads answer with what they learned for it
    fused, per_head = trained.ensemble.predict_proba(es.X, fit_rows=np.arange(len(es.ids)))
    ws.store.write_predictions(_heads.predictions_table(es, fused, {}, es.classes,
                                                        ood=_heads.ood_column(trained, fused)), fingerprint)
    id_of = {r["path"]: r["id"] for r in ws.store.images().select(["path", "id"]).to_pylist()}
    row_of = {id_: i for i, id_ in enumerate(es.ids)}
    class_index = {c: i for i, c in enumerate(es.classes)}
    pairs = [(row_of[id_of[p]], class_index[c]) for p, c in truth.items() if id_of.get(p) in row_of]
    rows, y = np.array([r for r, _ in pairs]), np.array([c for _, c in pairs])
    accuracies.append({head: float(np.mean(P[rows].argmax(axis=1) == y)) for head, P in {**per_head, "fused": fused}.items()})
    return len(rows)
