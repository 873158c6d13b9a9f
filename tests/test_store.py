"""The LanceDB store: incremental, duplicate-free, crash-safe indexing; loading; search."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from clipfuse.data import scan_folders
from clipfuse.embed import EmbedderConfig, create_embedder
from clipfuse.store import IndexConfig, Store, index_images
from conftest import write_mixed_folder, write_shapes_folder


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return create_embedder(EmbedderConfig(model=tiny_model, batch_size=4, workers=0))


def _index(db, embedder, labeled=None, **kw):
    folders = scan_folders(labeled, **kw)
    return index_images(Store(db), embedder, folders.files, folders.classes, config=IndexConfig(commit_every=5))


def _row_set(db):
    store = Store(db)
    images = store.images().to_pylist()
    version = store.get_version()
    vec_ids = store._version_table(version).to_arrow()["id"].to_pylist()
    return sorted((r["path"], r["id"], r["split"], r["label"]) for r in images), vec_ids


def test_index_then_reindex_embeds_nothing_new(tmp_path, embedder, shapes_dir):
    first = _index(tmp_path / "db", embedder, shapes_dir)
    assert (first.found, first.embedded, first.unchanged, first.errors) == (12, 12, 0, [])
    second = _index(tmp_path / "db", embedder, shapes_dir)
    assert (second.embedded, second.unchanged, second.duplicates) == (0, 12, 0)
    rows, vec_ids = _row_set(tmp_path / "db")
    assert len(rows) == 12 and len(vec_ids) == len(set(vec_ids)) == 12


def test_changed_file_is_re_embedded_and_relabel_needs_no_model(tmp_path, embedder, shapes_dir):
    _index(tmp_path / "db", embedder, shapes_dir)
    changed = shapes_dir / "red" / "000.png"
    shutil.copy(shapes_dir / "blue" / "001.png", changed)  # new content under an old path
    summary = _index(tmp_path / "db", embedder, shapes_dir)
    assert summary.unchanged == 11 and summary.duplicates == 1 and summary.embedded == 0
    from PIL import Image

    img = Image.open(shapes_dir / "green" / "000.png").convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))  # content no image of the store has
    img.save(changed)
    summary = _index(tmp_path / "db", embedder, shapes_dir)
    assert (summary.embedded, summary.duplicates, summary.errors) == (1, 0, [])  # new bytes: embedded
    # The same file indexed as unlabeled only updates its row.
    summary = _index(tmp_path / "db", embedder, unlabeled=shapes_dir / "green")
    assert summary.relabeled == 4 and summary.embedded == 0
    splits = {r["path"]: r["split"] for r in Store(tmp_path / "db").images().to_pylist()}
    assert splits[str(shapes_dir / "green" / "002.png")] == "unlabeled"


def test_duplicate_content_is_embedded_once(tmp_path, embedder, shapes_dir):
    (shapes_dir / "red" / "copy.png").write_bytes((shapes_dir / "red" / "001.png").read_bytes())
    (shapes_dir / "blue" / "copy.png").write_bytes((shapes_dir / "green" / "003.png").read_bytes())
    summary = _index(tmp_path / "db", embedder, shapes_dir)
    assert (summary.found, summary.embedded, summary.duplicates) == (14, 12, 2)
    rows, vec_ids = _row_set(tmp_path / "db")
    assert len(rows) == 14 and len(vec_ids) == 12
    es = Store(tmp_path / "db").load_embeddings()
    assert len(es.ids) == 12
    # green/003 is also filed under blue: that id has two labels and is left unlabeled.
    assert len(es.conflicts) == 1 and es.labels[list(es.ids).index(es.conflicts[0])] == -1


def test_bad_files_are_recorded_and_good_ones_indexed(tmp_path, embedder):
    files = write_mixed_folder(tmp_path / "mixed")
    summary = _index(tmp_path / "db", embedder, unlabeled=tmp_path / "mixed")
    assert summary.embedded == len(files["good"])
    assert sorted(p for p, _ in summary.errors) == sorted(str(p) for p in files["bad"])
    store = Store(tmp_path / "db")
    assert sorted(store.errors()["path"].to_pylist()) == sorted(str(p) for p in files["bad"])
    # Fixing a bad file clears its error on the next run.
    shutil.copy(files["good"][0], files["bad"][0])
    summary = _index(tmp_path / "db", embedder, unlabeled=tmp_path / "mixed")
    assert len(summary.errors) == len(files["bad"]) - 1
    assert str(files["bad"][0]) not in Store(tmp_path / "db").errors()["path"].to_pylist()


def test_load_embeddings_splits_and_labels(tmp_path, embedder):
    write_shapes_folder(tmp_path / "train", n_per_class=3, seed=1)
    write_shapes_folder(tmp_path / "test", n_per_class=2, seed=2)
    write_shapes_folder(tmp_path / "pool", n_per_class=2, seed=3)
    _index(tmp_path / "db", embedder, tmp_path / "train", unlabeled=tmp_path / "pool", test=tmp_path / "test")
    es = Store(tmp_path / "db").load_embeddings()
    assert es.classes == ["blue", "green", "red"]
    assert es.X.dtype == np.float32 and es.X.shape == (9 + 6 + 6, 16)
    np.testing.assert_allclose(np.linalg.norm(es.X, axis=1), 1.0, atol=1e-5)
    assert (es.labels >= 0).sum() == 9 and set(es.labels[es.splits == "labeled"]) == {0, 1, 2}
    assert (es.labels[es.splits != "labeled"] == -1).all()
    assert (es.test_labels[es.splits == "test"] >= 0).all() and (es.test_labels[es.splits != "test"] == -1).all()


def test_search_returns_self_first_and_rejects_other_dims(tmp_path, embedder, shapes_dir):
    _index(tmp_path / "db", embedder, shapes_dir)
    store = Store(tmp_path / "db")
    es = store.load_embeddings()
    ids, sims = store.search(es.X[:5], k=3)
    assert list(ids[:, 0]) == list(es.ids[:5])
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    with pytest.raises(ValueError, match="different model"):
        store.search(np.ones((1, 32), dtype=np.float32), k=3)
    with pytest.raises(LookupError, match="matches none"):
        store.search(es.X[:1], k=3, fingerprint="ffffffff")


def _fake_version(store, n, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    X = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"{seed}-{i:06d}" for i in range(n)]
    info = {"fingerprint": f"fake{seed}", "model": "fake", "dim": dim}
    store.register_version(info)
    store.add_embeddings(info["fingerprint"], ids, X)
    store.upsert_images([{"id": i, "path": f"/x/{i}.png", "split": "unlabeled", "label": None} for i in ids])
    store.activate(info["fingerprint"])
    return np.array(ids), X


def test_ann_index_matches_exact_search_and_persists(tmp_path):
    store = Store(tmp_path / "db", ann_threshold=100)
    ids, X = _fake_version(store, 3000)
    queries = X[:200] + 0.05 * np.random.default_rng(1).normal(size=(200, X.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_ids, _ = store.search(queries, k=10, exact=True)
    ann_ids, ann_sims = store.search(queries, k=10)  # above the threshold: hnswlib
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann_ids, exact_ids)])
    assert recall >= 0.95
    assert (tmp_path / "db" / "_ann" / "fake0.hnsw").exists()
    # A new Store loads the saved graph and extends it with rows added since.
    store2 = Store(tmp_path / "db", ann_threshold=100)
    rng = np.random.default_rng(5)
    extra = rng.normal(size=(10, X.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    store2.add_embeddings("fake0", [f"new-{i}" for i in range(10)], extra)
    found, sims = store2.search(extra, k=1)
    assert list(found[:, 0]) == [f"new-{i}" for i in range(10)]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-4)
    assert len(store2.ann_index("fake0")) == 3010


def test_memory_store_and_vector_lookup():
    store = Store("memory://")
    ids, X = _fake_version(store, 50, dim=8)
    np.testing.assert_array_equal(store.vectors_for([ids[3], ids[1]]), X[[3, 1]])
    with pytest.raises(KeyError, match="no vector"):
        store.vectors_for(["missing"])
    with pytest.raises(ValueError, match="8-d"):
        store.add_embeddings("fake0", ["a"], np.ones((1, 9), dtype=np.float32))
    # Inserting an id twice keeps one row.
    store.add_embeddings("fake0", [ids[0]], X[:1])
    assert store.get_version().rows == 50


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from clipfuse.data import scan_folders
    from clipfuse.embed import EmbedderConfig, create_embedder
    from clipfuse.store import IndexConfig, Store, index_images

    model, labeled, db, method, kill_at = sys.argv[1:]
    calls = 0
    original = getattr(Store, method)

    def crashing(self, *args, **kwargs):
        global calls
        if len(args[-1]):  # count only commits that carry rows
            calls += 1
            if calls == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    setattr(Store, method, crashing)
    embedder = create_embedder(EmbedderConfig(model=model, batch_size=2, workers=1))
    folders = scan_folders(labeled)
    index_images(Store(db), embedder, folders.files, folders.classes, config=IndexConfig(commit_every=3))
""")


@pytest.mark.parametrize("method, kill_at", [
    ("add_embeddings", 3),  # killed between batches: two commits complete, the third never starts
    ("upsert_images", 2),  # killed after a batch's vectors were committed but before its image rows
])
def test_killed_run_resumes_to_the_exact_row_set(tmp_path, tiny_model, embedder, method, kill_at):
    labeled = tmp_path / "labeled"
    write_shapes_folder(labeled, n_per_class=5)
    (labeled / "red" / "dup.png").write_bytes((labeled / "blue" / "002.png").read_bytes())
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), tiny_model, str(labeled), str(tmp_path / "db"), method,
                           str(kill_at)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    partial = Store(tmp_path / "db")
    done_before = len(partial.images().to_pylist())
    assert 0 < done_before < 16
    summary = _index(tmp_path / "db", embedder, labeled)
    assert summary.unchanged == done_before
    _index(tmp_path / "clean", embedder, labeled)
    assert _row_set(tmp_path / "db")[0] == _row_set(tmp_path / "clean")[0]
    vec_ids = _row_set(tmp_path / "db")[1]
    assert len(vec_ids) == len(set(vec_ids)) == 15
    assert sorted(vec_ids) == sorted(_row_set(tmp_path / "clean")[1])


def test_ann_search_settings_come_from_the_current_config(tmp_path):
    from clipfuse.store import AnnConfig

    store = Store(tmp_path / "db", ann_threshold=10, ann_config=AnnConfig(m=8, ef_search=16, threads=-1))
    _fake_version(store, 200, dim=8)
    store.ann_index()
    reopened = Store(tmp_path / "db", ann_threshold=10, ann_config=AnnConfig(m=48, ef_search=99)).ann_index()
    assert (reopened.config.m, reopened.config.ef_search) == (8, 99)  # graph kept, search settings new
    assert reopened._index.num_threads == (os.cpu_count() or 1)


def _index_roots(db, embedder, labeled=None, **kw):
    folders = scan_folders(labeled, **kw)
    return index_images(Store(db), embedder, folders.files, folders.classes, roots=folders.roots,
                        config=IndexConfig(commit_every=5))


def test_a_file_reached_through_two_folders_keeps_one_labeled_row(tmp_path, embedder, shapes_dir):
    for _ in range(2):  # stable across runs, not flipping between splits
        summary = _index_roots(tmp_path / "db", embedder, shapes_dir, unlabeled=shapes_dir)
        assert summary.relabeled == 0
    rows = Store(tmp_path / "db").images().to_pylist()
    assert len(rows) == 12 and {r["split"] for r in rows} == {"labeled"}


def test_moved_deleted_and_spoiled_files_leave_no_stale_rows(tmp_path, embedder, shapes_dir):
    db = tmp_path / "db"
    _index_roots(db, embedder, shapes_dir)
    shutil.move(shapes_dir / "red" / "000.png", shapes_dir / "blue" / "moved.png")  # relabel by moving
    (shapes_dir / "green" / "000.png").unlink()
    (shapes_dir / "green" / "001.png").write_text("no longer an image")
    summary = _index_roots(db, embedder, shapes_dir)
    assert summary.removed == 2 and summary.duplicates == 1 and len(summary.errors) == 1
    store = Store(db)
    paths = set(store.images()["path"].to_pylist())
    assert str(shapes_dir / "red" / "000.png") not in paths and str(shapes_dir / "green" / "000.png") not in paths
    assert str(shapes_dir / "green" / "001.png") not in paths  # its old content is gone too
    assert store.errors()["path"].to_pylist() == [str(shapes_dir / "green" / "001.png")]
    es = store.load_embeddings()
    assert es.conflicts == [] and (es.labels >= 0).sum() == 10
    # Folders not scanned in a run are never pruned.
    _index_roots(db, embedder, unlabeled=shapes_dir / "blue")
    assert len(Store(db).images().to_pylist()) == 10


def test_stale_error_of_an_unchanged_file_is_cleared(tmp_path, embedder, shapes_dir):
    _index(tmp_path / "db", embedder, shapes_dir)
    path = str(shapes_dir / "red" / "001.png")
    # As a run killed between recording an error and clearing it would leave things.
    Store(tmp_path / "db").record_errors([{"path": path, "reason": "corrupt image", "bytes": 0, "mtime": 0.0,
                                           "at": 0.0}])
    summary = _index(tmp_path / "db", embedder, shapes_dir)
    assert summary.unchanged == 12 and Store(tmp_path / "db").errors().num_rows == 0


def test_predictions_table_is_replaced_per_version(tmp_path):
    import pyarrow as pa

    store = Store(tmp_path / "db")
    _fake_version(store, 10, dim=4)
    fp = "fake0"
    assert store.predictions(fp) is None
    store.write_predictions(pa.table({"id": ["a", "b"], "label": ["x", "y"]}), fp)
    store.write_predictions(pa.table({"id": ["a"], "label": ["z"]}), fp)
    assert store.predictions(fp).to_pylist() == [{"id": "a", "label": "z"}]
    store.write_predictions(pa.table({"id": ["c"], "extra": [1.0]}), fp)  # other columns
    assert store.predictions(fp).column_names == ["id", "extra"]
    with pytest.raises(ValueError, match="'id' column"):
        store.write_predictions(pa.table({"x": [1]}), fp)
    assert store.heads_folder(fp) == tmp_path / "db" / "_heads" / fp
    with pytest.raises(ValueError, match="not on disk"):
        Store("memory://x").heads_folder()


def test_an_index_run_lists_the_tables_once_however_many_commits(tmp_path, embedder, monkeypatch):
    """Holding the writer lock, the store lists its tables once (and again only after creating one),
    and counts no version's rows per commit: the metadata work of a run does not grow with its commits."""
    import lancedb.db
    import lancedb.table

    calls = {"list": 0, "count": 0}
    list_tables, count_rows = lancedb.db.LanceDBConnection.list_tables, lancedb.table.LanceTable.count_rows

    def counted_list(self, *args, **kwargs):
        calls["list"] += 1
        return list_tables(self, *args, **kwargs)

    def counted_count(self, *args, **kwargs):
        calls["count"] += 1
        return count_rows(self, *args, **kwargs)

    monkeypatch.setattr(lancedb.db.LanceDBConnection, "list_tables", counted_list)
    monkeypatch.setattr(lancedb.table.LanceTable, "count_rows", counted_count)
    write_shapes_folder(tmp_path / "lab", n_per_class=8)
    folders = scan_folders(tmp_path / "lab")
    used = {}
    for commit_every in (2, 24):  # 12 commits, then 1, into stores of their own
        calls.update(list=0, count=0)
        store = Store(tmp_path / f"db{commit_every}")
        with store.writer():
            summary = index_images(store, embedder, folders.files, folders.classes, roots=folders.roots,
                                   config=IndexConfig(commit_every=commit_every, build_ann=False))
        assert summary.embedded == 24
        used[commit_every] = dict(calls)
    assert used[2] == used[24], used


def test_images_of_some_ids_keep_each_paths_latest_row(tmp_path, embedder, shapes_dir):
    """``images(ids)`` answers as ``images()`` filtered: a path stored twice (before the writer lock)
    counts with its latest row only, so an id it no longer holds does not list it."""
    _index(tmp_path / "db", embedder, shapes_dir)
    store = Store(tmp_path / "db")
    rows = store.images().to_pylist()
    path, other = rows[0], rows[1]
    stale = {**path, "id": other["id"], "indexed_at": path["indexed_at"] - 100}  # an older row of the same path
    table = store.db.open_table("images")
    table.add(pa.Table.from_pylist([stale], schema=table.schema))
    assert path["path"] not in store.images([other["id"]])["path"].to_pylist()
    assert store.images([path["id"]])["path"].to_pylist() == [path["path"]]
    assert sorted(store.images([path["id"], other["id"]])["path"].to_pylist()) == sorted([path["path"], other["path"]])


# ---- removing a version ---------------------------------------------------------------------------
def _publish_heads(store, fp, text="{}"):
    """Publish a generation of a version's heads folder as clipfuse.workspace.heads does (a link to ``<fp>.gen-*``)."""
    from clipfuse.data import AtomicFolder

    folder = AtomicFolder(store.heads_folder(fp), owns=lambda p: True, generations=True, stale_after=0.0)
    return folder.replace(lambda staging: (staging / "ensemble.json").write_text(text))


def _tables(store) -> set[str]:
    """The store's tables as LanceDB lists them now (no cache of the store's own)."""
    return set(store.db.list_tables(limit=1000).tables)


def _two_versions(db, **kw):
    store = Store(db, **kw)
    kept = {fp: _fake_version(store, 30, dim=8, seed=seed) for seed, fp in enumerate(["fake0", "fake1"])}
    return store, kept  # fake1 was activated last: it is the active version


def test_removing_a_version_drops_its_tables_index_and_heads_and_keeps_the_other(tmp_path):
    store, kept = _two_versions(tmp_path / "db", ann_threshold=10)
    for fp in kept:
        store.write_predictions(pa.table({"id": ["a"], "label": [fp]}), fp)
        store.ann_index(fp)  # saved beside the tables
    _publish_heads(store, "fake0", "old")
    _publish_heads(store, "fake0", "new")  # two generations: the current one and the one before it
    _publish_heads(store, "fake1")
    heads = tmp_path / "db" / "_heads"
    assert len(list(heads.glob("fake0.gen-*"))) == 2
    before = _tables(store)

    removed = store.remove_version("fake0")
    assert (removed.fingerprint, removed.rows, removed.dim) == ("fake0", 30, 8)
    assert _tables(store) == before - {"embeddings_fake0", "predictions_fake0"}
    assert {"embeddings_fake1", "predictions_fake1"} <= set(store.info()["tables"])
    assert sorted(p.name for p in heads.iterdir() if not p.name.startswith("fake1.gen-")) == ["fake1"]
    assert (heads / "fake1" / "ensemble.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "db" / "_ann").iterdir()) == \
        ["fake1.hnsw", "fake1.ids.npy", "fake1.json"]
    assert "fake0" not in store._ann
    # the other version is whole: vectors, predictions, its neighbour index, still active
    ids, X = kept["fake1"]
    np.testing.assert_array_equal(store.vectors_for(list(ids), "fake1"), X)
    es = store.load_embeddings()
    assert es.fingerprint == "fake1" and sorted(es.ids) == sorted(ids)
    assert store.predictions("fake1").to_pylist() == [{"id": "a", "label": "fake1"}]
    assert len(store.ann_index("fake1")) == 30
    info = store.info()
    assert [v["fingerprint"] for v in info["versions"]] == ["fake1"] and info["active"] == "fake1"
    assert [v.fingerprint for v in store.versions()] == ["fake1"]
    with pytest.raises(LookupError, match="matches none"):
        store.get_version("fake0")


def test_removing_the_active_version_activates_the_one_activated_last(tmp_path):
    store = Store(tmp_path / "db")
    for seed in range(3):
        _fake_version(store, 5, dim=4, seed=seed)
    store.register_version({"fingerprint": "fake3", "model": "fake", "dim": 4})  # never completed
    store.activate("fake1")  # activated: fake0, fake2, then fake1
    assert store.get_version().fingerprint == "fake1"
    assert store.remove_version("fake1").fingerprint == "fake1"
    assert store.get_version().fingerprint == "fake2"  # not the oldest, not the incomplete one
    store.remove_version("fake2")
    assert store.get_version().fingerprint == "fake0"
    store.remove_version("fake0")
    with pytest.raises(LookupError, match="no complete embedding version"):
        store.get_version()
    assert [v.fingerprint for v in store.versions()] == ["fake3"]


def test_remove_version_needs_one_named_known_version(tmp_path):
    store, _ = _two_versions(tmp_path / "db")
    with pytest.raises(ValueError, match="name the version"):
        store.remove_version(None)
    with pytest.raises(LookupError, match=r"matches none.*fake0 \(fake\), fake1 \(fake\)"):
        store.remove_version("nope")
    with pytest.raises(LookupError, match="matches several"):
        store.remove_version("fake")
    assert [v.fingerprint for v in store.versions()] == ["fake0", "fake1"]
    assert {"embeddings_fake0", "embeddings_fake1"} <= _tables(store)


def test_a_version_recorded_twice_is_removed_whole(tmp_path):
    store, _ = _two_versions(tmp_path / "db")
    table = store.db.open_table("embedding_versions")
    twice = [r for r in table.to_arrow().to_pylist() if r["fingerprint"] == "fake0"]
    table.add(pa.Table.from_pylist(twice, schema=table.schema))  # as two writers before the lock left it
    store.remove_version("fake0")
    assert store.db.open_table("embedding_versions").to_arrow()["fingerprint"].to_pylist() == ["fake1"]


def test_another_store_object_sees_the_removal_at_once(tmp_path):
    store, _ = _two_versions(tmp_path / "db")
    other = Store(tmp_path / "db")
    with store.writer():  # one hold: the table names are listed once and cached for the store's path
        assert "embeddings_fake0" in other.info()["tables"]
        store.remove_version("fake0")
        assert "embeddings_fake0" not in other.info()["tables"]
        assert [v.fingerprint for v in other.versions()] == ["fake1"]
        assert other.predictions("fake1") is None
        with pytest.raises(LookupError):
            other.load_embeddings("fake0")
        other.register_version({"fingerprint": "fake0", "model": "fake", "dim": 8})  # its table created afresh
        assert other.get_version("fake0").rows == 0
    assert Store(tmp_path / "db").get_version("fake0").rows == 0


def test_removing_a_version_of_a_remote_store_drops_its_tables():
    store = Store("memory://")
    for seed in range(2):
        _fake_version(store, 5, dim=4, seed=seed)
    store.write_predictions(pa.table({"id": ["a"]}), "fake1")
    assert store.remove_version("fake1").rows == 5
    assert not {"embeddings_fake1", "predictions_fake1"} & _tables(store)
    assert store.get_version().fingerprint == "fake0"
