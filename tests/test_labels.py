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
    assert "line 3: no image 'missing.png'" in r.output and "(line 4)" in r.output
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
    csv.write_text("id,label\n" + "".join(f"{ids[p]},{p.split('/')[-2]}\n" for p in pool)
                   + f"{ids[str(root / 'train' / 'red' / '003.png')]},\n")  # empty: take the label away
    r = _run("label", "--from-csv", csv, "--db", db)
    assert r.exit_code == 0 and "labeled 4 image(s)" in r.output, r.output
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
