"""Labels set by hand (clipfuse label): over the folders' labels, checked whole, kept with their history."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import clipfuse
from clipfuse.cli import app
from conftest import write_shapes_folder


@pytest.fixture
def indexed(tmp_path, tiny_model):
    """A store of 3 labeled classes x 4, an unlabeled pool of 3 and a test set of 3 (shapes)."""
    write_shapes_folder(tmp_path / "train", n_per_class=4)
    write_shapes_folder(tmp_path / "pool", n_per_class=1, seed=7)
    write_shapes_folder(tmp_path / "test", n_per_class=1, seed=8)
    db = tmp_path / "s.lance"
    clipfuse.open(db).index(tmp_path / "train", unlabeled=tmp_path / "pool", test=tmp_path / "test",
                            model=tiny_model)
    return tmp_path, db


def _run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(app, [str(a) for a in args])


def _label_of(ws, path) -> int:
    es = ws.store.load_embeddings()
    id_ = {r["path"]: r["id"] for r in ws.store.images().to_pylist()}[str(path)]
    return int(es.labels[list(es.ids).index(id_)])


def test_label_by_path_or_id_grows_classes_and_wins_over_the_folder_in_training(indexed):
    root, db = indexed
    ws = clipfuse.open(db)
    red1, pool_green = root / "train" / "red" / "001.png", root / "pool" / "green" / "000.png"
    assert ws.store.classes() == ["blue", "green", "red"]
    r = _run("label", red1, "green", "--db", db)
    assert r.exit_code == 0 and "red -> green" in r.output, r.output
    pool_id = {r["path"]: r["id"] for r in ws.store.images().to_pylist()}[str(pool_green)]
    r = _run("label", pool_id, "teal", "--db", db)  # by id; a new class name grows the class list
    assert r.exit_code == 0 and "new classes: teal" in r.output and "(no label) -> teal" in r.output, r.output
    assert ws.store.classes() == ["blue", "green", "red", "teal"]  # appended: old indices keep their meaning
    assert _label_of(ws, red1) == 1 and _label_of(ws, pool_green) == 3
    assert (root / "train" / "red" / "001.png").exists()  # the folder stays as it is
    r = _run("label", root / "train" / "red" / "002.png", "--remove", "--db", db)
    assert r.exit_code == 0 and "red -> (no label)" in r.output
    assert _label_of(ws, root / "train" / "red" / "002.png") == -1
    info = ws.info()
    assert info.labels_by_source == {"folder": 10, "human": 2, "human: no label": 1}
    assert info.per_class == {"blue": 4, "green": 5, "red": 2, "teal": 1}
    trained = ws.train_heads(heads="probe,knn", folds=2)
    assert trained.n_train + trained.n_val == 12  # 12 folder labels, one moved, one taken away, one added
    assert len(trained.scores["fused"]["per_class_accuracy"]) == 4  # one per class, teal included
    assert "labels: folder 10, human 2, human: no label 1" in _run("info", "--db", db).output


def test_a_label_on_a_test_image_scores_and_is_never_trained_on(indexed):
    root, db = indexed
    ws = clipfuse.open(db)
    test_img = root / "test" / "blue" / "000.png"
    ws.label(test_img, "red")
    es = ws.store.load_embeddings()
    i = list(es.ids).index({r["path"]: r["id"] for r in ws.store.images().to_pylist()}[str(test_img)])
    assert es.labels[i] == -1 and es.test_labels[i] == es.classes.index("red") and es.splits[i] == "test"


def test_bad_labels_are_named_and_nothing_is_written(indexed):
    root, db = indexed
    ws = clipfuse.open(db)
    r = _run("label", "no-such-image.png", "red", "--db", db)
    assert r.exit_code != 0 and "no image 'no-such-image.png' in the store" in r.output, r.output
    for bad, why in (("a/b", "can't be a folder name"), ("  ", "empty class name"), ("x\ty", "control characters")):
        r = _run("label", root / "train" / "red" / "000.png", bad, "--db", db)
        assert r.exit_code != 0 and why in r.output, r.output
    r = _run("label", root / "train" / "red" / "000.png", "--db", db)
    assert r.exit_code != 0 and "give the CLASS" in r.output
    r = _run("label", root / "train" / "red" / "000.png", "blue", "--remove", "--db", db)
    assert r.exit_code != 0 and "--remove takes no CLASS" in r.output
    csv = root / "fixes.csv"
    csv.write_text(f"path,label\n{root / 'train' / 'red' / '000.png'},blue\nmissing.png,red\n"
                   f"{root / 'train' / 'red' / '001.png'},a/b\n")
    r = _run("label", "--from-csv", csv, "--db", db)
    assert r.exit_code != 0 and "nothing was labeled: 2 problem(s)" in r.output, r.output
    assert "row 2: no image 'missing.png'" in r.output and "(row 3)" in r.output
    csv.write_text(f"path,label\n{root / 'train' / 'red' / '000.png'},blue\n{root / 'train' / 'red' / '000.png'},green\n")
    r = _run("label", "--from-csv", csv, "--db", db)
    assert r.exit_code != 0 and "labeled twice" in r.output
    csv.write_text("name,class\nx,y\n")
    r = _run("label", "--from-csv", csv, "--db", db)
    assert r.exit_code != 0 and "needs an id (or path) column and a label column" in r.output
    assert ws.store.label_history().num_rows == 0 and ws.store.classes() == ["blue", "green", "red"]


def test_a_csv_labels_all_its_rows_in_one_commit_and_every_change_is_kept(indexed):
    root, db = indexed
    ws = clipfuse.open(db)
    ids = {r["path"]: r["id"] for r in ws.store.images().to_pylist()}
    pool = sorted(p for p in ids if "/pool/" in p)
    csv = root / "labels.csv"
    csv.write_text("id,label,remove\n" + "".join(f"{ids[p]},{p.split('/')[-2]},\n" for p in pool)
                   + f"{ids[str(root / 'train' / 'red' / '003.png')]},,true\n"  # remove: take the label away
                   + f"{ids[str(root / 'train' / 'red' / '002.png')]},,\n")  # empty: says nothing, skipped
    r = _run("label", "--from-csv", csv, "--db", db)
    assert r.exit_code == 0 and "labeled 4 image(s)" in r.output, r.output
    assert _label_of(ws, root / "train" / "red" / "002.png") >= 0
    assert [_label_of(ws, p) for p in pool] == [0, 1, 2]  # blue, green, red pool images now train
    assert _label_of(ws, root / "train" / "red" / "003.png") == -1
    ws.label(pool[0], "green")  # changed again: both changes stay in the history
    history = ws.label_history(pool[0])
    assert [h["label"] for h in history] == ["blue", "green"] and all(h["source"] == "human" for h in history)
    assert history[0]["at"] <= history[1]["at"] and history[0]["path"] == pool[0]
    assert _label_of(ws, pool[0]) == 1
    r = _run("label", "--history", "--json", "--db", db)
    rows = json.loads(r.output)
    assert len(rows) == 5 and {"id", "path", "label", "source", "at"} <= set(rows[0])
    r = _run("label", "--history", "--db", db)
    assert r.exit_code == 0 and "label history (5 changes)" in r.output and "(no label)" in r.output
    assert np.sum(ws.store.load_embeddings().labels >= 0) == 12 - 1 + 3


def _blobs(tmp_path, seed=0):
    """3 separated classes in 16-d: 20 labels each (3 of them flipped), 60 unlabeled; a labeled row copied
    under another label; a test row that copies a labeled one."""
    import polars as pl

    rng = np.random.default_rng(seed)
    centres = np.eye(3, 16) * 4.0
    y = np.repeat(np.arange(3), 40)
    X = centres[y] + rng.normal(0, 0.6, (120, 16))
    rows = [{"id": f"img{i:03d}", "label": None, "split": "unlabeled"} for i in range(120)]
    labeled = [i for c in range(3) for i in np.flatnonzero(y == c)[:20]]
    for i in labeled:
        rows[i].update(label=f"c{y[i]}", split="labeled")
    flipped = [labeled[0], labeled[25], labeled[50]]
    for i in flipped:
        rows[i]["label"] = f"c{(y[i] + 1) % 3}"
    X = np.vstack([X, X[labeled[5]], X[labeled[45]]])  # a copy under another label; a test copy of a labeled one
    rows.append({"id": "copy-under-c1", "label": "c1", "split": "labeled"})
    rows.append({"id": "test-copy", "label": None, "split": "test"})
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    np.save(tmp_path / "v.npy", X.astype(np.float32))
    pl.DataFrame(rows).write_parquet(tmp_path / "rows.parquet")
    return [rows[i]["id"] for i in flipped], rows[labeled[5]]["id"], rows[labeled[45]]["id"]


def test_suspects_find_flipped_labels_copies_under_two_labels_and_test_leaks(tmp_path):
    flipped, copied, leaked = _blobs(tmp_path)
    ws = clipfuse.open(tmp_path / "s.lance")
    ws.import_embeddings(tmp_path / "v.npy", metadata=tmp_path / "rows.parquet")
    with pytest.raises(FileNotFoundError, match="run `clipfuse train-heads` first"):
        ws.suspects()
    ws.train_heads(heads="probe,knn,propagation", folds=3)
    result = ws.suspects(n=5)
    top = [s.id for s in result.suspects[:4]]
    assert set(flipped) <= set(top), (top, flipped)  # the copy under c1 is the fourth suspect
    for s in result.suspects[:3]:
        assert s.flagged and s.score > 0.5 and s.suggested != s.given
    assert result.judged == 61 and result.flagged >= 3
    pair = [c for c in result.conflicts if set(c["ids"]) == {copied, "copy-under-c1"}]
    assert pair and pair[0]["labels"] == ["c0", "c1"] and pair[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert [(leak["test_id"], leak["labeled_id"]) for leak in result.leaks] == [("test-copy", leaked)]
    r = _run("suspects", "--db", tmp_path / "s.lance", "-n", "3", "--json")
    data = json.loads(r.output)
    assert {"id", "path", "given", "suggested", "score"} <= set(data["suspects"][0]) and len(data["suspects"]) == 3
    r = _run("suspects", "--db", tmp_path / "s.lance", "-n", "3", "--csv", tmp_path / "sus.csv")
    assert r.exit_code == 0 and "test image duplicates a labeled one" in r.output, r.output
    assert (tmp_path / "sus.csv").read_text().startswith("id,path,given,suggested,score,flagged,reason\n")
    ws.label(flipped[0], result.suspects[[s.id for s in result.suspects].index(flipped[0])].suggested)
    again = ws.suspects(n=5)  # judged as trained: says the labels changed since
    assert any("changed since train-heads" in n.message for n in again.notices)


def test_suggest_asks_about_uncertain_images_unlabeled_regions_and_never_twice_the_same(tmp_path):
    import polars as pl

    rng = np.random.default_rng(3)
    centres = np.eye(4, 16) * 3.0
    y = np.repeat(np.arange(4), 50)  # class 3 is a region nobody labeled
    X = centres[y] + rng.normal(0, 0.5, (200, 16))
    between = (centres[0] + centres[1]) / 2 + rng.normal(0, 0.05, (4, 16))  # halfway between two classes
    X = np.vstack([X, between, np.repeat(between[:1], 3, axis=0)])  # and three exact copies of the first
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labels = [f"c{y[i]}" if y[i] < 3 and i % 50 < 8 else None for i in range(200)] + [None] * 7
    ids = [f"img{i:03d}" for i in range(len(X))]
    np.save(tmp_path / "v.npy", X.astype(np.float32))
    pl.DataFrame({"id": ids, "label": labels}).write_parquet(tmp_path / "rows.parquet")
    ws = clipfuse.open(tmp_path / "s.lance")
    ws.import_embeddings(tmp_path / "v.npy", metadata=tmp_path / "rows.parquet")
    ws.train_heads(heads="probe,knn,propagation", folds=2)
    result = ws.suggest(n=6)
    picked = [s.id for s in result.suggestions]
    assert len(picked) == 6 and len(set(picked)) == 6 and result.candidates == 207 - 24
    planted = {f"img{i:03d}" for i in range(200, 207)}  # halfway between two classes, all near-duplicates
    assert len(planted & set(picked)) == 1  # asked about, once: one batch never holds two near-duplicates
    assert sum(150 <= int(p[3:]) < 200 for p in picked) >= 3  # most of the batch: the class nobody labeled
    assert all(s.reason and s.predicted in ("c0", "c1", "c2") for s in result.suggestions)
    assert any("no labels" in s.reason for s in result.suggestions)
    r = _run("suggest", "--db", tmp_path / "s.lance", "-n", "4", "--json")
    rows = json.loads(r.output)
    assert len(rows) == 4 and {"id", "path", "predicted", "reason"} <= set(rows[0])
    r = _run("suggest", "--db", tmp_path / "s.lance", "-n", "4", "--csv", tmp_path / "next.csv")
    assert r.exit_code == 0 and "label these next" in r.output
    assert (tmp_path / "next.csv").read_text().startswith("id,path,predicted,confidence,reason,label\n")


def test_suspects_name_one_content_filed_under_two_classes(indexed, tiny_model):
    import shutil

    root, db = indexed
    shutil.copy(root / "train" / "red" / "000.png", root / "train" / "blue" / "copy.png")
    ws = clipfuse.open(db)
    ws.index(root / "train", unlabeled=root / "pool", test=root / "test")
    ws.train_heads(heads="probe,knn", folds=2)
    result = ws.suspects(n=3)
    same = [c for c in result.conflicts if len(c["ids"]) == 1]
    assert len(same) == 1 and same[0]["labels"] == ["blue", "red"]
    assert same[0]["paths"] == sorted([str(root / "train" / "blue" / "copy.png"), str(root / "train" / "red" / "000.png")])


def test_the_suggest_sheet_round_trip_and_ambiguous_csvs(indexed):
    """A sheet from `suggest --csv` with a few labels filled in labels those and touches no other image;
    ambiguous sheets are refused whole; the order of changes holds when the clock steps back."""
    import time as _time

    root, db = indexed
    ws = clipfuse.open(db)
    ids = {r["path"]: r["id"] for r in ws.store.images().to_pylist()}
    pool = sorted(p for p in ids if "/pool/" in p)
    red = str(root / "train" / "red" / "000.png")
    ws.label(pool[0], "red")  # labeled meanwhile: a blank row of the sheet must not remove it
    sheet = root / "next.csv"
    sheet.write_text("id,path,predicted,confidence,reason,label\n"
                     f"{ids[pool[0]]},{pool[0]},red,0.5,uncertain,\n"
                     f"{ids[pool[1]]},{pool[1]},red,0.5,uncertain,green\n"
                     f"{ids[pool[2]]},{pool[2]},red,0.5,uncertain,\n")
    r = _run("label", "--from-csv", sheet, "--db", db)
    assert r.exit_code == 0 and "labeled 1 image(s)" in r.output, r.output
    assert [h["label"] for h in ws.label_history()] == ["red", "green"]
    before = ws.store.label_history().num_rows
    for text, message in [
        (f"id,path,label\n{ids[pool[2]]},{red},blue\n", "name different images"),
        (f"id,ID,label\n{ids[pool[2]]},{ids[red]},blue\n", "more than once"),
        (f"id,label,label\n{ids[pool[2]]},blue,red\n", "more than once"),
        (f"id,label,remove\n{ids[pool[2]]},blue,true\n", "gives the label 'blue' and remove"),
        (f"id,label,remove\n{ids[pool[2]]},,maybe\n", "remove must be true or false"),
        (f"id,label\n{ids[pool[2]]},caf\u00e9\n{ids[pool[1]]},b,c,d\n", "more fields than its header")]:
        bad = root / "bad.csv"
        bad.write_text(text)
        r = _run("label", "--from-csv", bad, "--db", db)
        assert r.exit_code != 0 and message in r.output, (text, r.output)
    (root / "latin.csv").write_bytes("id,label\n".encode() + ids[pool[2]].encode() + ",caf\xe9\n".encode("latin-1"))
    r = _run("label", "--from-csv", root / "latin.csv", "--db", db)
    assert r.exit_code != 0 and "not UTF-8" in r.output
    assert ws.store.label_history().num_rows == before
    # one class however its accent is typed; a label set again to the same class writes nothing
    ws.label(pool[2], "cafe\u0301")
    assert ws.label(pool[2], "caf\u00e9").changes == [] and ws.store.classes().count("caf\u00e9") == 1
    # a clock stepped back does not put the newer change first
    real = _time.time
    try:
        _time.time = lambda: real() - 3600
        ws.label(pool[2], "blue")
    finally:
        _time.time = real
    assert ws.label_history(pool[2])[-1]["label"] == "blue" and _label_of(ws, pool[2]) == 0
    # contradictory flags and a --csv file in the way are refused
    assert _run("label", pool[2], "red", "--history", "--db", db).exit_code == 2
    assert _run("label", pool[2], "red", "--json", "--db", db).exit_code == 2


def test_info_counts_only_images_the_store_holds(indexed):
    root, db = indexed
    ws = clipfuse.open(db)
    gone = root / "pool" / "blue" / "000.png"
    ws.label(gone, "blue")
    assert ws.info().labels_by_source.get("human") == 1 and ws.info().per_class["blue"] == 5
    gone.unlink()
    ws.index(root / "train", unlabeled=root / "pool", test=root / "test")
    info = ws.info()
    assert info.labels_by_source.get("human", 0) == 0 and info.per_class["blue"] == 4
