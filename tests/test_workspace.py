"""The Python API (``clipfuse.open``): every workflow called directly, typed results, no printing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

import clipfuse
from clipfuse.workspace import (
    EvaluateResult,
    ExportResult,
    ImportResult,
    IndexResult,
    NeighborsResult,
    OptionError,
    PredictResult,
    TrainResult,
    Workspace,
)
from conftest import write_shapes_folder


@pytest.fixture
def ws(tmp_path, tiny_model):
    """A workspace over labeled (8 per class), unlabeled (6 per class) and labeled test (3 per class) shapes."""
    write_shapes_folder(tmp_path / "labeled", n_per_class=8, seed=0)
    write_shapes_folder(tmp_path / "unlabeled", n_per_class=6, seed=1)
    write_shapes_folder(tmp_path / "test", n_per_class=3, seed=2)
    ws = clipfuse.open(tmp_path / "store.lance")
    ws.indexed = ws.index(tmp_path / "labeled", unlabeled=tmp_path / "unlabeled", test=tmp_path / "test",
                          model=tiny_model, batch_size=8)
    ws.root = tmp_path
    return ws


def test_open_returns_a_workspace_and_creates_nothing_until_the_first_index(tmp_path):
    ws = clipfuse.open(tmp_path / "new.lance")
    assert isinstance(ws, Workspace) and not (tmp_path / "new.lance").exists()
    with pytest.raises(FileNotFoundError, match="no store at"):
        ws.info()
    with pytest.raises(OptionError, match="give a LABELED_DIR") as e:
        ws.index()
    assert e.value.option == "LABELED_DIR" and isinstance(e.value, ValueError)
    assert not (tmp_path / "new.lance").exists()


def test_index_reports_counts_progress_and_reindexes_nothing(ws, tiny_model):
    first = ws.indexed
    assert isinstance(first, IndexResult) and first.model == tiny_model
    assert (first.summary.found, first.summary.embedded, first.summary.errors) == (51, 51, [])
    steps = []
    again = ws.index(ws.root / "labeled", unlabeled=ws.root / "unlabeled", test=ws.root / "test",
                     progress=lambda stage, done, total: steps.append((stage, done, total)))
    assert (again.summary.embedded, again.summary.unchanged) == (0, 51)
    assert again.fingerprint == first.fingerprint
    assert steps[-1] == ("indexing", 51, 51)  # the bar ends full
    assert any(stage.startswith("loading model") for stage, _, _ in steps)


def test_neighbors_by_path_id_and_text(ws):
    query = ws.root / "unlabeled" / "red" / "000.png"
    found = ws.neighbors(query, k=3)
    assert isinstance(found, NeighborsResult) and "stored vector" in found.query
    top = found.neighbors[0]
    assert top.paths == [str(query)] and top.similarity == pytest.approx(1.0, abs=1e-4) and top.split == "unlabeled"
    assert [n.rank for n in found.neighbors] == [1, 2, 3]
    assert all(a.similarity >= b.similarity for a, b in zip(found.neighbors, found.neighbors[1:]))
    by_id = ws.neighbors(top.id, k=1)
    assert by_id.neighbors[0].id == top.id and by_id.query == f"id {top.id}"
    by_text = ws.neighbors(text="a red circle", k=4)
    assert len(by_text.neighbors) == 4 and by_text.query == "text 'a red circle'"
    assert json.loads(json.dumps(by_text.to_dict()))["neighbors"][0]["rank"] == 1
    reads = []
    images = ws.store.images
    ws.store.images = lambda ids=None: reads.append(ids) or images(ids)
    ws.neighbors(query, k=2)
    assert len(reads) == 1 and len(reads[0]) == 2  # only the image rows of the neighbours shown
    ws.store.images = images
    with pytest.raises(OptionError, match="not both or neither"):
        ws.neighbors(query, text="x")
    with pytest.raises(OptionError) as e:
        ws.neighbors(query, version="ffffffff")
    assert e.value.option == "--version" and "matches none" in str(e.value)


def test_info_is_typed_and_counts_splits(ws):
    info = ws.info(errors=True)
    assert info.per_split == {"labeled": 24, "unlabeled": 18, "test": 9}
    assert info.per_class == {"blue": 8, "green": 8, "red": 8}
    (version,) = info.versions
    assert version.fingerprint == info.active == ws.indexed.fingerprint and version.rows == 51
    assert version.has_text_tower and not version.imported and version.short == version.fingerprint[:12]
    assert info.error_list == [] and json.dumps(info.to_dict(), default=str)


def test_train_predict_evaluate_export_through_the_api(ws):
    steps = []
    trained = ws.train_heads(heads="probe,knn,propagation,zero-shot", folds=2,
                             progress=lambda stage, done, total: steps.append((stage, done, total)))
    assert isinstance(trained, TrainResult)
    assert trained.heads == ["probe", "knn", "propagation", "zero-shot"] and trained.unavailable == {}
    assert set(trained.scores) == {*trained.heads, "fused"} and trained.n_val + trained.n_train == 24
    assert set(trained.weights) == set(trained.heads) and all(w >= 0 for w in trained.weights.values())
    assert steps[-1][0] == "heads fitted" and steps[-1][1] == steps[-1][2] == 4 * (2 + 1 + 1)
    assert (trained.folder / "config.json").exists()

    predicted = ws.predict()
    assert isinstance(predicted, PredictResult) and predicted.images == 51 and predicted.new_since_training == 0
    assert not [c for c in ws.store.predictions().column_names if c.startswith("probs_")]
    subset = ws.predict(heads=["probe", "knn"], per_head=True)
    assert subset.heads == ["probe", "knn"]
    assert {"probs_probe", "probs_knn"} <= set(ws.store.predictions().column_names)
    with pytest.raises(OptionError, match="unknown head"):
        ws.predict(heads="nope")
    ws.predict()

    evaluated = ws.evaluate(out=ws.root / "eval")
    assert isinstance(evaluated, EvaluateResult) and evaluated.n_test == 9 and evaluated.test is not None
    assert evaluated.validation["fused"]["accuracy"] == pytest.approx(trained.fused_accuracy)
    assert {p.name for p in evaluated.files} >= {"metrics.json", "confusion_val.png", "confusion_test.png"}
    assert sum(evaluated.val_counts) == evaluated.n_val

    exported = ws.export(ws.root / "test.csv", split="test", probs=True)
    assert isinstance(exported, ExportResult) and exported.rows == 9 and exported.missing == 0
    rows = list(csv.DictReader(open(ws.root / "test.csv", encoding="utf-8")))
    assert list(rows[0]) == ["path", "id", "label", "confidence", "ood", "p_blue", "p_green", "p_red"]
    with pytest.raises(FileExistsError, match="--force"):
        ws.export(ws.root / "test.csv", split="test")


def test_kaggle_export_is_id_label_with_file_stems(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "labeled", n_per_class=4, seed=0)
    shapes = write_shapes_folder(tmp_path / "shapes", n_per_class=3, seed=1)
    (tmp_path / "pool").mkdir()
    for cls, files in shapes.items():  # a flat pool with unique names, as competition test sets come
        for f in files:
            f.rename(tmp_path / "pool" / f"img_{cls}_{f.stem}.png")
    ws = clipfuse.open(tmp_path / "db")
    ws.index(tmp_path / "labeled", unlabeled=tmp_path / "pool", model=tiny_model)
    ws.train_heads(heads="probe,knn", folds=2)
    ws.predict()
    out = tmp_path / "submission.csv"
    result = ws.export(out, split="unlabeled", format="kaggle")
    lines = out.read_text().splitlines()
    assert lines[0] == "id,label" and result.rows == len(lines) - 1 == 9 and result.format == "kaggle"
    predicted = {r["id"]: r["label"] for r in ws.store.predictions().to_pylist()}
    expected = sorted(f"{r['path'].rsplit('/', 1)[1][:-4]},{predicted[r['id']]}"
                      for r in ws.store.images().to_pylist() if r["split"] == "unlabeled")
    assert sorted(lines[1:]) == expected and lines[1].startswith("img_")
    with pytest.raises(OptionError, match="two columns"):
        ws.export(out, format="kaggle", probs=True, force=True)


def test_kaggle_export_refuses_ambiguous_file_names(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "labeled", n_per_class=4, seed=0)
    write_shapes_folder(tmp_path / "pool", n_per_class=2, seed=1)  # pool/red/000.png and pool/blue/000.png
    ws = clipfuse.open(tmp_path / "db")
    ws.index(tmp_path / "labeled", unlabeled=tmp_path / "pool", model=tiny_model)
    ws.train_heads(heads="probe", folds=2)
    ws.predict()
    with pytest.raises(ValueError, match="more than once without their extension"):
        ws.export(tmp_path / "sub.csv", format="kaggle")
    assert not (tmp_path / "sub.csv").exists()


def test_import_embeddings_from_npy_then_train(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 20)
    X = centers[y] + 0.3 * rng.normal(size=(60, 16))
    np.save(tmp_path / "v.npy", X.astype(np.float32))
    labels = [f"c{c}" if i % 20 < 8 else None for i, c in enumerate(y)]
    pl.DataFrame({"id": [f"img{i:03d}" for i in range(60)], "label": labels}).write_parquet(tmp_path / "m.parquet")
    ws = clipfuse.open(tmp_path / "db")
    imported = ws.import_embeddings(tmp_path / "v.npy", metadata=tmp_path / "m.parquet")
    assert isinstance(imported, ImportResult) and (imported.rows, imported.dim, imported.images) == (60, 16, 60)
    version = ws.version()
    assert version.imported and not version.has_text_tower and version.rows == 60
    trained = ws.train_heads(heads="zero-shot,probe,propagation", folds=2)
    assert "no text tower" in trained.unavailable["zero-shot"] and trained.fused_accuracy > 0.8
    with pytest.raises(OptionError, match="needs --metadata"):
        ws.import_embeddings(tmp_path / "v.npy")


def test_finetune_wise_ft_reembed_through_the_api(ws):
    ft = ws.finetune(out=ws.root / "ft", epochs=2, lr=1e-3, batch_size=8)
    assert ft.out == ws.root / "ft" and len(ft.history) == 2 and ft.version == ws.indexed.fingerprint
    assert ft.train_images + ft.pseudo_labels > 0 and ft.best_accuracy >= ft.start_accuracy
    wise = ws.wise_ft(ws.root / "ft", alphas="0,0.5,1")
    assert wise.alphas == [0.0, 0.5, 1.0] and wise.best_accuracy == max(wise.accuracies) and wise.curve.exists()
    assert wise.out == ws.root / "ft-wiseft"
    re = ws.reembed(wise.out, batch_size=8)
    assert isinstance(re, IndexResult) and re.summary.embedded == 51 and re.previous == ws.indexed.fingerprint
    assert ws.version().fingerprint == re.fingerprint != ws.indexed.fingerprint
    assert ws.version().model_name.folder == wise.out.resolve()
    trained = ws.train_heads(heads="finetuned,probe", folds=2)
    assert trained.heads == ["finetuned", "probe"]
    with pytest.raises(FileExistsError, match="orphan"):
        ws.finetune(out=wise.out, epochs=1)


def test_pseudo_labels_are_the_pick_of_the_pseudo_label_head(ws):
    from clipfuse.classify import select_pseudo_labels

    ws.train_heads(heads="probe,knn", folds=2)
    ws.predict()
    picked = ws.pseudo_labels(None, per_class=2, min_confidence=0.0)
    table = ws.store.predictions().to_pylist()
    unlabeled = [r for r in table if r["split"] == "unlabeled"]
    rows, labels = select_pseudo_labels(np.array([r["label_index"] for r in unlabeled]),
                                        np.array([r["confidence"] for r in unlabeled]), 2, n_classes=3)
    paths = {r["id"]: r["path"] for r in ws.store.images().to_pylist()}
    assert picked == [(paths[unlabeled[i]["id"]], int(c)) for i, c in zip(rows, labels)]
    assert len(picked) <= 6 and all(sum(c == k for _, c in picked) <= 2 for k in range(3))


def test_select_pseudo_labels_balances_classes_and_respects_the_threshold():
    from clipfuse.classify import select_pseudo_labels

    pred = np.array([0, 0, 0, 1, 1, 2])
    conf = np.array([0.5, 0.9, 0.7, 0.95, 0.2, 0.99])
    rows, labels = select_pseudo_labels(pred, conf, 2, min_confidence=0.3, n_classes=3)
    assert rows.tolist() == [1, 2, 3, 5] and labels.tolist() == [0, 0, 1, 2]


def test_the_digits_job_runs_through_the_api_alone(tmp_path, tiny_model):
    result = clipfuse.open(tmp_path / "unused").demo(tmp_path / "demo", model=tiny_model, unlabeled=60, k=3)
    assert result.model == tiny_model and result.fallback is None
    assert result.index.summary.found == 150 + 60 and len(result.neighbors.neighbors) == 3
    assert result.neighbors.neighbors[0].paths[0] != result.query  # the query itself is left out
    assert [n.rank for n in result.neighbors.neighbors] == [1, 2, 3]
    (training,), (accuracy,) = result.training, result.unlabeled_accuracy
    assert result.unlabeled_scored == 60 and set(accuracy) == {*training.heads, "fused"}
    assert 0.0 <= accuracy["fused"] <= 1.0
    lines = (tmp_path / "demo" / "predictions.csv").read_text().splitlines()
    assert result.exported.rows == len(lines) - 1 == 60


def test_light_commands_import_no_model_libraries(ws, tmp_path):
    """info, export, neighbours of a stored image and --help load no torch, open_clip or timm."""
    ws.train_heads(heads="probe", folds=2)
    ws.predict()
    query = ws.root / "labeled" / "red" / "001.png"
    script = f"""
import sys
from typer.testing import CliRunner
from clipfuse.cli import app
runner = CliRunner()
for args in (["--help"], ["info", "--db", {str(ws.db)!r}],
             ["export", {str(tmp_path / 'x.csv')!r}, "--db", {str(ws.db)!r}],
             ["neighbors", {str(query)!r}, "--db", {str(ws.db)!r}, "-k", "2"]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
heavy = sorted(m for m in ("torch", "open_clip", "timm", "hnswlib") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout


# ---- found in review: each of these failed before its fix --------------------------------------
def test_writing_a_model_folder_leaves_the_users_look_alike_folders_alone(tmp_path):
    from clipfuse.data import AtomicFolder
    from clipfuse.train.checkpoint import is_model_folder

    def model(folder, kind="finetuned"):
        folder.mkdir()
        (folder / "clipfuse.json").write_text(json.dumps({"kind": kind}))
        (folder / "open_clip_model.safetensors").write_bytes(b"w")

    for name in ("ft.old", "ft.tmp", "ft.old-2024", "ft1.old-abc"):  # a user's own folders, models or not
        model(tmp_path / name) if name != "ft.tmp" else (tmp_path / name).mkdir()
    (tmp_path / "ft.old-2024" / "notes.txt").write_text("mine")  # not only model files: never ours
    target = AtomicFolder(tmp_path / "ft[1]", owns=is_model_folder)  # glob characters in the name
    target.replace(lambda staging: (staging / "clipfuse.json").write_text(json.dumps({"kind": "wise-ft"})))
    assert json.loads((tmp_path / "ft[1]" / "clipfuse.json").read_text())["kind"] == "wise-ft"
    assert all((tmp_path / n).is_dir() for n in ("ft.old", "ft.tmp", "ft.old-2024", "ft1.old-abc"))

    # a crash between the renames: the old model is aside, the folder missing; the next write restores
    # it first and then replaces it, and readers are pointed at it meanwhile
    folder = AtomicFolder(tmp_path / "m", owns=is_model_folder)
    folder.replace(lambda staging: (staging / "clipfuse.json").write_text(json.dumps({"kind": "finetuned"})))
    (tmp_path / "m").rename(tmp_path / "m.old-x1y2z3")
    assert folder.current() == tmp_path / "m.old-x1y2z3"
    folder.recover()
    assert (tmp_path / "m").is_dir() and not list(tmp_path.glob("m.old-*"))


def test_table_names_are_listed_afresh_each_time_the_writer_lock_is_taken(tmp_path):
    import pyarrow as pa

    from clipfuse.store import Store

    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(4, 8)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.normal(size=(4, 8)).astype(np.float32))
    pl.DataFrame({"id": ["a", "b", "c", "d"]}).write_parquet(tmp_path / "m.parquet")
    ws = clipfuse.open(tmp_path / "db")
    first = ws.import_embeddings(tmp_path / "a.npy", metadata=tmp_path / "m.parquet").fingerprint
    second = ws.import_embeddings(tmp_path / "b.npy", metadata=tmp_path / "m.parquet").fingerprint
    table = pa.table({"id": ["a"], "x": [1]})
    mine = Store(tmp_path / "db")
    mine.write_predictions(table, first)
    mine.write_predictions(table, first)
    Store(tmp_path / "db").write_predictions(table, second)  # another writer creates a table in between
    mine.write_predictions(table, second)  # once failed: "table ... already exists"
    assert mine.predictions(second).num_rows == 1


def test_kaggle_ids_of_imported_rows_and_formula_like_names(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(2, 8))
    y = np.repeat([0, 1], 10)
    np.save(tmp_path / "v.npy", (centers[y] + 0.1 * rng.normal(size=(20, 8))).astype(np.float32))
    ids = [f"img.{i:03d}" for i in range(18)] + ["=cmd", "-5"]
    labels = [("+1" if c else "-1") if i % 10 < 4 else None for i, c in enumerate(y)]
    pl.DataFrame({"id": ids, "label": labels}).write_parquet(tmp_path / "m.parquet")
    notices = []
    ws = clipfuse.open(tmp_path / "db", on_notice=notices.append)
    ws.import_embeddings(tmp_path / "v.npy", metadata=tmp_path / "m.parquet")
    ws.train_heads(heads="probe", folds=2)
    ws.predict()
    ws.export(tmp_path / "raw.csv", format="kaggle", raw_cells=True)
    rows = list(csv.DictReader(open(tmp_path / "raw.csv", encoding="utf-8")))
    assert {r["id"] for r in rows} == {i for i, lab in zip(ids, labels) if lab is None}  # ids as imported
    assert {r["label"] for r in rows} <= {"+1", "-1"}
    result = ws.export(tmp_path / "safe.csv", format="kaggle")
    assert any("--raw-cells" in n.message for n in result.notices)
    assert "'=cmd" in (tmp_path / "safe.csv").read_text()


def test_option_errors_name_the_option(ws, tmp_path):
    for kwargs, option in (({"heads": []}, "--heads"), ({"heads": ","}, "--heads"),
                           ({"val_fraction": 1.5}, "--val-fraction"), ({"folds": 1}, "--folds"),
                           ({"graph": "x"}, "--graph")):
        with pytest.raises(OptionError) as e:
            ws.train_heads(**kwargs)
        assert e.value.option == option, kwargs
    with pytest.raises(OptionError) as e:
        ws.neighbors(ws.root / "labeled" / "red" / "000.png", device="bogus")
    assert e.value.option == "--device"
    with pytest.raises(FileNotFoundError, match="no store at"):
        clipfuse.open(f"file://{tmp_path}/missing.lance").info()


def test_loading_a_model_leaves_the_callers_logging_as_it_was(ws, tmp_path):
    import logging

    from PIL import Image

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        new = tmp_path / "new.png"
        Image.open(ws.root / "labeled" / "red" / "000.png").rotate(90).save(new)
        assert "embedded now" in ws.neighbors(new, k=1).query  # loads the model
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)
