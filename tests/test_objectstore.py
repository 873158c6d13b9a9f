"""Stores on object storage (a real S3 API: moto's server on 127.0.0.1): the store, its writer lease, errors."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

import clipfuse
from clipfuse.store import Store
from clipfuse.store.lock import StoreBusyError
from clipfuse.store.objectlock import S3Lease


def _import(ws, folder, n=200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    np.save(folder / f"v{seed}.npy", X)
    labels = [f"c{i % 4}" if i < 40 else None for i in range(n)]
    pl.DataFrame({"id": [f"img{i:04d}" for i in range(n)], "label": labels}).write_parquet(folder / "rows.parquet")
    return X, ws.import_embeddings(folder / f"v{seed}.npy", metadata=folder / "rows.parquet")


def test_a_store_on_s3_holds_and_reads_back_what_a_local_one_does(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/stores/main"
    ws = clipfuse.open(uri)
    assert ws.db == uri and ws.store.storage_options["allow_http"] == "true"  # the endpoint says http://
    X, imported = _import(ws, tmp_path)
    local = clipfuse.open(tmp_path / "local.lance")
    _, local_import = _import(local, tmp_path)
    assert imported.fingerprint == local_import.fingerprint and imported.rows == 200
    es = clipfuse.open(uri).store.load_embeddings()  # another Workspace, as another process would
    np.testing.assert_array_equal(es.X, local.store.load_embeddings().X)
    info = clipfuse.open(uri).info()
    assert info.versions[0].rows == 200 and info.per_class == {"c0": 10, "c1": 10, "c2": 10, "c3": 10}
    hits = ws.neighbors("img0007", k=3)
    assert hits.neighbors[0].id == "img0007" and hits.neighbors[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "stores").exists()  # nothing landed on the local disk


def test_the_writer_lease_keeps_a_writer_of_another_process_out_and_is_released(s3_bucket):
    uri = f"s3://{s3_bucket}/store"
    other = f"""
import time
from clipfuse.store import Store
from clipfuse.store.lock import StoreBusyError
waits = []
store = Store({uri!r}, lock_timeout=1.5, on_lock_wait=waits.append)
started = time.monotonic()
try:
    with store.writer("clipfuse train-heads"):
        print("got it")
except StoreBusyError as e:
    print("busy", round(time.monotonic() - started, 1), "|", waits[0], "|", e)
"""
    with Store(uri).writer("clipfuse index"):
        record, etag = S3Lease(uri).holder()
        assert record["what"] == "clipfuse index" and etag
        out = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120).stdout
        assert out.startswith("busy") and float(out.split()[1]) >= 1.4, out
        assert "clipfuse index (pid" in out and "is being written by clipfuse index" in out
    assert S3Lease(uri).holder() == ({}, None)  # released
    out = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "got it"


def test_a_second_process_waits_for_the_lease_and_a_dead_holders_lease_expires(s3_bucket, s3_endpoint):
    uri = f"s3://{s3_bucket}/store"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from clipfuse.store.objectlock import S3Lease
lease = S3Lease({uri!r}, lease_seconds=3)
assert lease.try_acquire("clipfuse index (other process)") is None
print("held", flush=True)
time.sleep(60)  # killed before it releases: its lease stops being renewed
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store = Store(uri, lock_timeout=0.5)
        with pytest.raises(StoreBusyError, match="other process"):
            with store.writer("clipfuse predict"):
                pass
        holder.kill()
        holder.wait()
        store.lock_timeout = 10  # the dead holder's 3 s lease runs out; then this writer takes it over
        started = time.monotonic()
        with store.writer("clipfuse predict"):
            assert S3Lease(uri).holder()[0]["what"] == "clipfuse predict"
        assert time.monotonic() - started < 10
    finally:
        holder.kill()


def test_a_held_lease_is_renewed_past_its_length(s3_bucket):
    uri = f"s3://{s3_bucket}/store"
    lease = S3Lease(uri, lease_seconds=1.5)
    assert lease.try_acquire("long job") is None
    lease.start_renewing()
    try:
        time.sleep(2.5)  # longer than the lease: only renewal keeps it
        other = S3Lease(uri, lease_seconds=1.5)
        assert other.try_acquire("intruder") is not None
        lease.check()
    finally:
        lease.release()
    assert S3Lease(uri).try_acquire("next") is None


def test_a_missing_bucket_is_named(s3_endpoint, tmp_path):
    ws = clipfuse.open("s3://no-such-bucket-here/store")
    with pytest.raises(FileNotFoundError, match="the bucket 'no-such-bucket-here' of store .* does not exist"):
        ws.info()
    with pytest.raises(FileNotFoundError, match="the bucket 'no-such-bucket-here'"):
        _import(ws, tmp_path)


def test_index_into_s3_gives_the_local_run_s_version_and_vectors(s3_bucket, tmp_path, tiny_model):
    from conftest import write_shapes_folder

    write_shapes_folder(tmp_path / "labeled", n_per_class=3, seed=0)
    (tmp_path / "labeled" / "red" / "broken.png").write_bytes(b"not an image")
    remote = clipfuse.open(f"s3://{s3_bucket}/store")
    done = remote.index(tmp_path / "labeled", model=tiny_model, batch_size=4)
    local = clipfuse.open(tmp_path / "local.lance")
    here = local.index(tmp_path / "labeled", model=tiny_model, batch_size=4)
    assert done.fingerprint == here.fingerprint and done.summary.embedded == 9
    assert [e[0] for e in done.summary.errors] == [str(tmp_path / "labeled" / "red" / "broken.png")]
    a, b = remote.store.load_embeddings(), local.store.load_embeddings()
    assert list(a.ids) == list(b.ids)
    np.testing.assert_allclose(a.X, b.X, atol=1e-6)
    again = remote.index(tmp_path / "labeled", model=tiny_model, batch_size=4)  # nothing new: nothing embedded
    assert again.summary.embedded == 0


def test_writing_a_store_without_a_writer_lock_there_is_refused(tmp_path):
    store = Store("gs://some-bucket/store")
    with pytest.raises(OSError, match="writing to gs:// is not supported yet"):
        with store.writer("clipfuse index"):
            pass


def test_the_cli_takes_an_s3_store_and_storage_options(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clipfuse.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # given as a storage option instead
    db = f"s3://{s3_bucket}/cli"
    opts = ["--storage-option", f"endpoint={s3_endpoint}", "--storage-option", "region=us-east-1"]
    _import(clipfuse.open(tmp_path / "scratch.lance"), tmp_path)  # writes v0.npy and rows.parquet
    r = runner.invoke(app, ["import-embeddings", str(tmp_path / "v0.npy"), "--metadata", str(tmp_path / "rows.parquet"),
                            "--db", db, *opts])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", "--db", db, "--json", *opts])
    assert r.exit_code == 0, r.output
    assert '"rows": 200' in r.output
    r = runner.invoke(app, ["neighbors", "img0003", "--db", db, "--k", "2", *opts])
    assert r.exit_code == 0 and "img0003" in r.output, r.output
    r = runner.invoke(app, ["train-heads", "--db", db, "--heads", "probe,knn", "--folds", "2", *opts])
    assert r.exit_code == 0 and "fused validation accuracy" in r.output, r.output
    assert runner.invoke(app, ["predict", "--db", db, *opts]).exit_code == 0
    r = runner.invoke(app, ["export", str(tmp_path / "out.csv"), "--db", db, *opts])
    assert r.exit_code == 0 and "wrote 160 rows" in r.output, r.output
    r = runner.invoke(app, ["info", "--db", db, "--storage-option", "endpoint"])
    assert r.exit_code == 2 and "is not KEY=VALUE" in r.output
    r = runner.invoke(app, ["info", "--db", "s3://"])
    assert r.exit_code == 2 and "names no bucket" in r.output


def test_heads_on_s3_are_trained_reloaded_on_another_machine_and_exported(s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/store"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-a"))
    ws = clipfuse.open(uri)
    _import(ws, tmp_path, seed=0)
    trained = ws.train_heads(heads="probe,knn,propagation", folds=2)
    assert str(trained.folder).startswith(str(tmp_path / "cache-a"))  # this machine's copy of what it uploaded
    first = ws.predict(per_head=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))  # "another machine": nothing cached
    other = clipfuse.open(uri)
    again = other.predict(per_head=True)
    assert again.images == first.images == 200 and again.heads == first.heads
    report = other.evaluate(out=tmp_path / "eval")
    assert report.validation["fused"]["accuracy"] == trained.scores["fused"]["accuracy"]
    assert (tmp_path / "cache-b").is_dir()
    out = other.export(tmp_path / "pred.csv")
    assert out.rows == 160  # the unlabeled images
    # a second version and an ensemble over both, on S3 too
    _import(ws, tmp_path, seed=1)
    fps = [v.fingerprint for v in ws.versions()]
    ens = ws.train_heads(versions=fps, heads="probe", folds=2)
    assert len(ens.heads) == 2 and other.predict(versions=fps).images == 200
    listed = other.info().ensembles  # saved ensembles are listed on S3 as on disk
    assert [sorted(e["fingerprints"]) for e in listed] == [sorted(fps)]
    assert listed[0]["stale"] is None and listed[0]["folder"].startswith(f"{uri}/_heads/ensemble-")
    first = trained.version
    retrained = ws.train_heads(version=first, heads="probe", folds=2)  # a new generation replaces the old whole
    assert clipfuse.open(uri).predict(version=first).heads == ["probe"] and retrained.folder != trained.folder
    ws.train_heads(version=first, heads="knn", folds=2)
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix=f"store/_heads/{first}/", Delimiter="/")
    assert len(listed["CommonPrefixes"]) == 2  # the current generation and the one before it, not the first
    ws.remove_version(first)  # its heads go with it
    left = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix=f"store/_heads/{first}/")
    assert left.get("KeyCount", 0) == 0 and len(ws.versions()) == 1


def test_the_neighbour_index_of_an_s3_store_is_kept_in_this_machine_s_cache(s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/store"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    X, imported = _import(clipfuse.open(uri), tmp_path)
    store = Store(uri, ann_threshold=10)  # 200 rows: the hnswlib index answers
    ids, sims = store.search(X[:3], k=5)
    assert list(ids[:, 0]) == ["img0000", "img0001", "img0002"]
    saved = list((tmp_path / "cache").rglob(f"{imported.fingerprint}.hnsw"))
    assert len(saved) == 1 and saved[0].parent.name == "_ann"
    fresh = Store(uri, ann_threshold=10)  # another process on this machine: loads it, reads no vectors
    monkeypatch.setattr(Store, "_read_vectors", lambda *a, **k: pytest.fail("the cached index was rebuilt"))
    again, _ = fresh.search(X[:3], k=5)
    assert (again == ids).all()


def test_a_reembedded_version_s_model_folder_is_kept_beside_an_s3_store_for_other_machines(
        s3_bucket, tmp_path, monkeypatch, tiny_model):
    from conftest import write_shapes_folder

    uri = f"s3://{s3_bucket}/store"
    images = tmp_path / "train"
    write_shapes_folder(images, n_per_class=6)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-a"))
    notices = []
    ws = clipfuse.open(uri, on_notice=notices.append)
    ws.index(images, model=tiny_model)
    ws.finetune(out=tmp_path / "ft", epochs=1, batch_size=8)
    made = ws.reembed(tmp_path / "ft")
    new = made.summary.fingerprint
    assert any(n.kind == "model-copy" and new in n.message for n in notices)
    trained = ws.train_heads(heads="finetuned,probe", folds=2)
    assert "finetuned" in trained.heads

    (tmp_path / "ft").rename(tmp_path / "ft-elsewhere")  # "another machine": no model folder, an empty cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))
    other = clipfuse.open(uri)
    again = other.train_heads(heads="finetuned,probe", folds=2)  # the finetuned head, from the store's copy
    assert "finetuned" in again.heads and again.version == new
    hits = other.neighbors(text="a red circle", k=2)  # the version's own text tower, loaded from the copy
    assert hits.version == new and len(hits.neighbors) == 2
    write_shapes_folder(tmp_path / "more", n_per_class=1, seed=9)
    grown = other.index(tmp_path / "more").summary  # the active version's model, same fingerprint: no new version
    assert grown.fingerprint == new and grown.embedded == 3 and len(other.versions()) == 2
    assert (tmp_path / "cache-b").is_dir()
    import boto3

    other.remove_version(new)
    left = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix=f"store/_models/{new}/")
    assert left.get("KeyCount", 0) == 0
