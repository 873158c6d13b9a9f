"""The README's guarantees, tried as a hostile user would: concurrent writers, kills, odd and malicious files.

Each test names the defect it guards against; every one of them failed before the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from clipfuse.cli import app
from clipfuse.store import Store, index_images
from conftest import write_shapes_folder

runner = CliRunner()
CLIPFUSE = [sys.executable, "-m", "clipfuse.cli"]


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def plain(result) -> str:
    """Output as one line of words, without the frame typer draws around usage errors."""
    return " ".join(result.output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


def raw_rows(db: Path, table: str) -> pl.DataFrame:
    """A table as stored, duplicates included (the Store's reads hide them)."""
    return pl.from_arrow(Store(db).db.open_table(table).to_arrow())


@pytest.fixture(scope="module")
def embedder(tiny_model):
    from clipfuse.embed import EmbedderConfig, create_embedder

    return create_embedder(EmbedderConfig(model=tiny_model, batch_size=4, workers=0))


def _race(n: int, target) -> list:
    """Run ``target(i)`` in ``n`` threads released together by a barrier; re-raise the first error."""
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def _assert_store_has_no_duplicates(db: Path, n_files: int) -> None:
    versions = raw_rows(db, "embedding_versions")
    assert versions.height == versions["fingerprint"].n_unique() == 1
    classes = raw_rows(db, "classes")
    assert classes.height == classes["name"].n_unique()
    images = raw_rows(db, "images")
    assert images.height == images["path"].n_unique() == n_files
    vectors = raw_rows(db, versions["table"][0])
    assert vectors.height == vectors["id"].n_unique() == n_files


@contextlib.contextmanager
def _held_elsewhere(db: Path, what: str):
    """Hold the store's writer lock in another thread (another context) for the block."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with Store(db).writer(what):
            holding.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        yield
    finally:
        release.set()
        holder.join(30)


class _Output:
    """Collects a process's output lines on a thread, so the test can wait for one."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout))
        self._reader.start()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(text in line for line in self.lines), self.lines
        return self.text

    def finish(self, timeout: float = 240) -> str:
        assert self.proc.wait(timeout=timeout) == 0, self.lines
        self._reader.join(30)
        return self.text

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.lines).split())


# ---- 1, 2: concurrent writers --------------------------------------------------------------------
@pytest.mark.parametrize("attempt", range(4))
def test_two_index_runs_on_a_new_store_register_one_version(tmp_path, embedder, attempt):
    """Defect 1: both runs read 'no version yet', both appended one; every later command then failed."""
    from clipfuse.data import scan_folders

    write_shapes_folder(tmp_path / "labeled", n_per_class=3, seed=attempt)
    folders = scan_folders(tmp_path / "labeled")
    db = tmp_path / "s.lance"
    _race(2, lambda i: index_images(Store(db), embedder, folders.files, folders.classes, roots=folders.roots))
    _assert_store_has_no_duplicates(db, len(folders.files))
    assert Store(db).get_version().fingerprint == embedder.fingerprint
    assert invoke("info", "--db", db).exit_code == 0


@pytest.mark.parametrize("attempt", range(3))
def test_two_index_runs_on_one_folder_of_an_existing_store_leave_no_duplicates(tmp_path, embedder, attempt):
    """Defect 2: concurrent merge-inserts each inserted the new paths and vectors (or died in a commit conflict)."""
    from clipfuse.data import scan_folders

    write_shapes_folder(tmp_path / "labeled", n_per_class=2, seed=attempt)
    db = tmp_path / "s.lance"
    first = scan_folders(tmp_path / "labeled")
    index_images(Store(db), embedder, first.files, first.classes, roots=first.roots)
    write_shapes_folder(tmp_path / "more", n_per_class=4, seed=10 + attempt)
    folders = scan_folders(tmp_path / "labeled", unlabeled=tmp_path / "more")
    summaries = _race(2, lambda i: index_images(Store(db), embedder, folders.files, folders.classes,
                                                roots=folders.roots, config=_small_commits()))
    _assert_store_has_no_duplicates(db, len(folders.files))
    assert sorted(s.embedded for s in summaries) == [0, 12]  # the second writer waited, then found it all done


def _small_commits():
    from clipfuse.store import IndexConfig

    return IndexConfig(commit_every=2)


def test_two_index_processes_at_once_both_succeed(tmp_path, tiny_model):
    """The issue's reproduction, as two real command lines started together."""
    write_shapes_folder(tmp_path / "lab", n_per_class=3)
    db = tmp_path / "s.lance"
    cmd = CLIPFUSE + ["index", str(tmp_path / "lab"), "--db", str(db), "--model", tiny_model]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _assert_store_has_no_duplicates(db, 9)
    assert invoke("neighbors", tmp_path / "lab" / "red" / "000.png", "--db", db, "--json").exit_code == 0


def test_a_second_writer_waits_with_a_message_and_readers_never_wait(tmp_path, tiny_model):
    from clipfuse.store import StoreBusyError

    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model).exit_code == 0
    with _held_elsewhere(db, "a test holding the lock"):
        # another process waits, and says for whom
        out = _Output(subprocess.Popen(CLIPFUSE + ["train-heads", "--db", str(db), "--heads", "probe", "--folds", "2"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        # readers in the meantime: no lock, no wait
        assert invoke("info", "--db", db, "--json").exit_code == 0
        result = invoke("neighbors", tmp_path / "lab" / "red" / "000.png", "--db", db, "-k", 2)
        assert result.exit_code == 0, result.output
        # a writer in this process with a timeout gives up clearly
        with pytest.raises(StoreBusyError, match="a test holding the lock"):
            with Store(db, lock_timeout=0.5).writer():
                pass
        waited = out.wait_for("being written by")
        assert "being written by a test holding the lock" in waited and "(Ctrl-C to stop)" in waited
        time.sleep(1)
        assert out.proc.poll() is None and "heads fitted" not in out.text  # still waiting: it has fitted nothing
    assert "trained 1 heads" in out.finish()


def test_a_killed_writer_never_leaves_the_lock_held(tmp_path):
    from clipfuse.store import StoreBusyError

    db = tmp_path / "s.lance"
    script = ("import sys, time; from clipfuse.store import Store\n"
              "with Store(sys.argv[1]).writer('doomed'):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError, match="doomed"):
            with Store(db, lock_timeout=0.3).writer():
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((db / "_writer.lock").read_text())["what"] == "doomed"  # its record stays behind...
    with Store(db, lock_timeout=5).writer("next"):  # ...but the kernel dropped the lock with the process
        pass


def test_writer_lock_is_reentrant_and_shared_with_helper_threads(tmp_path):
    import contextvars

    store = Store(tmp_path / "s.lance")
    with store.writer("outer"):
        with store.writer("inner"):  # re-entrant
            pass
        # a helper thread started with the holder's context writes under its lock ...
        done = []
        t = threading.Thread(target=contextvars.copy_context().run, args=(lambda: done.append(store.add_classes(["a"])),))
        t.start()
        t.join(10)
        assert done == [["a"]]
        # ... a thread with its own context waits for it
        other = []
        t = threading.Thread(target=lambda: other.append(_try_lock(store)))
        t.start()
        t.join(10)
        assert other == ["busy"]
    assert _try_lock(store) == "free"


def _try_lock(store) -> str:
    from clipfuse.store import StoreBusyError

    try:
        with Store(store.uri, lock_timeout=0.2).writer():
            return "free"
    except StoreBusyError:
        return "busy"


def test_duplicates_written_before_the_lock_are_hidden_reported_and_repaired(tmp_path, tiny_model):
    """Defect 2, the aftermath: stores that already hold duplicates read right, report them, and heal."""
    write_shapes_folder(tmp_path / "lab", n_per_class=3)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model).exit_code == 0
    store = Store(db)
    version = store.get_version()
    for name in ("images", "embedding_versions", "classes", version.table):  # what two racing writers left
        table = store.db.open_table(name)
        table.add(table.to_arrow().slice(0, 4))
    query = tmp_path / "lab" / "red" / "000.png"
    found = json.loads(invoke("neighbors", query, "--db", db, "-k", 9, "--json").output)["neighbors"]
    assert len({r["id"] for r in found}) == len(found) == 9  # one id listed twice at similarity 1.0 before
    info = json.loads(invoke("info", "--db", db, "--json").output)
    assert info["images"] == 9 and info["per_class"] == {"blue": 3, "green": 3, "red": 3}
    assert info["duplicates"] == {"versions": 1, "classes": 3, "images": 4, "errors": 0, "vectors": 4}
    assert "duplicate rows" in invoke("info", "--db", db).output
    assert invoke("train-heads", "--db", db, "--heads", "probe,knn", "--folds", 2).exit_code == 0
    assert invoke("predict", "--db", db).exit_code == 0
    assert invoke("export", tmp_path / "all.csv", "--db", db, "--split", "all").exit_code == 0
    assert pl.read_csv(tmp_path / "all.csv").height == 9  # not 9 + duplicates
    result = invoke("index", tmp_path / "lab", "--db", db)
    assert result.exit_code == 0 and "repaired the store first" in " ".join(result.output.split())
    _assert_store_has_no_duplicates(db, 9)
    assert json.loads(invoke("info", "--db", db, "--json").output)["duplicates"] == dict.fromkeys(
        ("versions", "classes", "images", "errors", "vectors"), 0)


# ---- 3, 4: file names and files that are not images ------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_recorded_and_never_stops_the_run(tmp_path, tiny_model):
    """Defect 3: the error row could not be written, the version never became active, every re-run crashed."""
    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    pool = tmp_path / "pool"
    write_shapes_folder(pool, n_per_class=1, seed=4)
    bad = os.path.join(os.fsencode(pool), b"caf\xe9-latin1.png")
    with open(bad, "wb") as f:
        f.write((pool / "red" / "000.png").read_bytes())
    db = tmp_path / "s.lance"
    for _ in range(2):  # the re-run must work as well
        result = invoke("index", tmp_path / "lab", "--unlabeled", pool, "--db", db, "--model", tiny_model)
        assert result.exit_code == 0, result.output
    errors = json.loads(invoke("info", "--db", db, "--errors", "--json").output)["error_list"]
    assert [e["path"] for e in errors] == [str(pool / "caf\\xe9-latin1.png")]
    assert "not valid UTF-8" in errors[0]["reason"]
    assert Store(db).get_version().rows == 9


def test_a_class_folder_name_that_is_not_utf8_is_a_clear_error(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "lab", n_per_class=1)
    os.rename(tmp_path / "lab" / "red", os.path.join(os.fsencode(tmp_path / "lab"), b"r\xe9d"))
    result = invoke("index", tmp_path / "lab", "--db", tmp_path / "s.lance", "--model", tiny_model)
    assert result.exit_code == 1 and "not valid UTF-8" in result.output and "rename the folder" in plain(result)


def _index_in_a_process(tmp_path, tiny_model, pool, *extra) -> Path:
    """Run `clipfuse index` in its own process, bounded in time and memory (the defects hung, or ate RAM)."""
    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    db = tmp_path / "s.lance"
    cmd = CLIPFUSE + ["index", str(tmp_path / "lab"), "--unlabeled", str(pool), "--db", str(db), "--model", tiny_model,
                      *extra]

    def limit_memory():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return db


def _error_reasons(db: Path) -> dict[str, str]:
    return {Path(e["path"]).name: e["reason"]
            for e in json.loads(invoke("info", "--db", db, "--errors", "--json").output)["error_list"]}


def test_fifos_and_devices_are_recorded_not_read(tmp_path, tiny_model):
    """Defect 4: a FIFO named .jpg hung `index` forever; a symlink to /dev/zero read until memory ran out."""
    pool = tmp_path / "pool"
    pool.mkdir()
    os.mkfifo(pool / "pipe.jpg")
    os.symlink("/dev/zero", pool / "zero.png")
    db = _index_in_a_process(tmp_path, tiny_model, pool)
    errors = _error_reasons(db)
    assert "FIFO" in errors["pipe.jpg"] and "character device" in errors["zero.png"]
    assert Store(db).get_version().rows == 6


def test_files_over_the_size_cap_are_recorded_not_read(tmp_path, tiny_model):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "big.png").write_bytes(b"\x89PNG" + b"\0" * (2 * 2**20))
    db = _index_in_a_process(tmp_path, tiny_model, pool, "--max-file-size", "1")
    assert "larger than the 1 MiB limit" in _error_reasons(db)["big.png"]


def test_a_fifo_as_query_is_a_clear_error(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model).exit_code == 0
    os.mkfifo(tmp_path / "q.png")
    result = invoke("neighbors", tmp_path / "q.png", "--db", db)
    assert result.exit_code == 2 and "FIFO" in plain(result)


# ---- 5: CSV injection ---------------------------------------------------------------------------------
HOSTILE_CLASSES = ['=HYPERLINK("evil.example","x")', "@SUM(A1)", "+cmd", "-2+3"]


def test_export_neutralises_cells_a_spreadsheet_would_run(tmp_path, tiny_model):
    """Defect 5: class names such as =HYPERLINK(...) landed verbatim in label cells."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(HOSTILE_CLASSES):
        for split, n in (("lab", 4), ("pool", 2)):
            folder = tmp_path / split / name if split == "lab" else tmp_path / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((40, 40, 3), 60 * c, dtype=np.uint8) + rng.integers(0, 30, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.png")
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--unlabeled", tmp_path / "pool", "--db", db, "--model",
                  tiny_model).exit_code == 0
    assert invoke("train-heads", "--db", db, "--heads", "probe,knn", "--folds", 2).exit_code == 0
    assert invoke("predict", "--db", db).exit_code == 0
    assert invoke("export", tmp_path / "out.csv", "--db", db, "--split", "all", "--probs").exit_code == 0
    text = (tmp_path / "out.csv").read_text()
    cells = [cell for line in text.splitlines() for cell in _csv_cells(line)]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
    labels = set(pl.read_csv(tmp_path / "out.csv")["label"])
    assert labels <= {"'" + c for c in HOSTILE_CLASSES} and labels
    assert invoke("export", tmp_path / "raw.csv", "--db", db, "--split", "all", "--raw-cells").exit_code == 0
    assert set(pl.read_csv(tmp_path / "raw.csv")["label"]) <= set(HOSTILE_CLASSES)


def _csv_cells(line: str) -> list[str]:
    import csv

    return next(csv.reader([line]))


def test_write_csv_neutralises_every_text_cell_and_header(tmp_path):
    from clipfuse.data import neutralise_cell, write_csv

    path = write_csv(tmp_path / "t.csv", ["=h", "ok"], [["=1+1", 3.5], ["\tx", -1], ["fine", "-x"]])
    assert path.read_text().splitlines() == ["'=h,ok", "'=1+1,3.5", "'\tx,-1", "fine,'-x"]
    assert neutralise_cell(-2) == -2 and neutralise_cell("a=b") == "a=b"


# ---- 6: checkpoints that run code --------------------------------------------------------------------
def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A torch file whose first object makes the weights-only unpickler raise TypeError, and whose
    second runs a shell command when unpickled in full."""
    import collections

    import torch

    class Trigger:
        def __reduce__(self):
            storage = torch.zeros(1).untyped_storage()
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (1,), (1,), False, collections.OrderedDict()),
                    (False, None, collections.OrderedDict()))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"trigger": Trigger(), "payload": Payload()}, path)
    return path


@pytest.fixture
def tiny_builtin(tmp_path):
    """The tiny CLIP registered as a built-in open_clip name, so that --pretrained FILE applies to it."""
    import open_clip

    from conftest import TINY_MODEL_CFG

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "clipfuse-tiny-test.json").write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(tmp_path / "cfg")
    return "clipfuse-tiny-test"


def test_no_checkpoint_path_unpickles_code_even_when_torch_is_told_to(tmp_path, monkeypatch, tiny_builtin, shapes_dir):
    """Defect 6: open_clip retried a refused load without weights_only, and the environment made that unsafe."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    # 1. --pretrained FILE with an open_clip architecture
    result = invoke("index", shapes_dir, "--db", tmp_path / "a.lance", "--model", tiny_builtin, "--pretrained", evil)
    assert result.exit_code == 1 and "could not load pretrained weights" in result.output
    assert not marker.exists()
    # 2. a local-dir: folder whose only weights are a pickle
    folder = tmp_path / "folder"
    folder.mkdir()
    from conftest import TINY_MODEL_CFG

    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {}}))
    os.link(evil, folder / "open_clip_pytorch_model.bin")
    result = invoke("index", shapes_dir, "--db", tmp_path / "b.lance", "--model", f"local-dir:{folder}")
    assert result.exit_code == 1 and not marker.exists()
    # 3. a timm backbone's weights file
    result = invoke("index", shapes_dir, "--db", tmp_path / "c.lance", "--model", "timm:test_efficientnet",
                    "--pretrained", evil)
    assert result.exit_code == 1 and not marker.exists()
    # 4. wise-ft reaches the base model through the folder's metadata
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "open_clip_model.safetensors").write_bytes(b"")
    (ft / "clipfuse.json").write_text(json.dumps({"kind": "finetuned", "base_model": tiny_builtin,
                                                  "base_pretrained": str(evil), "base_random_weights": False,
                                                  "base_fingerprint": "0" * 16}))
    result = invoke("wise-ft", "--checkpoint", ft, "--db", tmp_path / "a.lance")
    assert result.exit_code == 1 and not marker.exists()


def test_a_plain_pickle_state_dict_still_loads(tmp_path, tiny_builtin, shapes_dir):
    """The guard refuses code, not torch files: a .pt of tensors loads as before."""
    import open_clip
    import torch

    torch.manual_seed(0)
    state = open_clip.create_model(tiny_builtin, load_weights=False).state_dict()
    torch.save(state, tmp_path / "w.pt")
    result = invoke("index", shapes_dir, "--db", tmp_path / "s.lance", "--model", tiny_builtin,
                    "--pretrained", tmp_path / "w.pt")
    assert result.exit_code == 0, result.output
    assert torch.load is torch.serialization.load  # the guard is lifted after loading


# ---- 7: imported vectors of extreme magnitude ------------------------------------------------------------
def test_imported_vectors_of_any_magnitude_keep_their_direction(tmp_path):
    """Defect 7: float32 norms overflowed (1e30 rows stored as zeros) or underflowed (1e-30 rows refused)."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(4, 16))
    X = np.concatenate([directions[:2] * 1e30, directions[2:] * 1e-30]).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    pl.DataFrame({"id": [f"v{i}" for i in range(4)]}).write_csv(tmp_path / "rows.csv")
    db = tmp_path / "s.lance"
    result = invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv", "--db", db)
    assert result.exit_code == 0, result.output
    es = Store(db).load_embeddings()
    got = es.X[np.argsort(es.ids)]
    expected = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.save(tmp_path / "z.npy", np.zeros((4, 16), dtype=np.float32))
    zero = invoke("import-embeddings", tmp_path / "z.npy", "--metadata", tmp_path / "rows.csv", "--db", db)
    assert zero.exit_code == 1 and "all-zero" in zero.output


# ---- 8 and the other atomic writes: nothing is written through a planted name ---------------------------
@pytest.fixture
def trained(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "lab", n_per_class=4)
    write_shapes_folder(tmp_path / "pool", n_per_class=2, seed=5)
    write_shapes_folder(tmp_path / "test", n_per_class=2, seed=6)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--unlabeled", tmp_path / "pool", "--test", tmp_path / "test",
                  "--db", db, "--model", tiny_model).exit_code == 0
    assert invoke("train-heads", "--db", db, "--heads", "probe,knn", "--folds", 2).exit_code == 0
    assert invoke("predict", "--db", db).exit_code == 0
    return tmp_path, db


def test_export_never_writes_through_a_planted_temporary_name(trained):
    """Defect 8: export wrote `<path>.tmp`, following a symlink planted there, even without --force."""
    root, db = trained
    victim = root / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, root / "out.csv.tmp")
    (root / "notes.csv.tmp").write_text("my own notes")
    assert invoke("export", root / "out.csv", "--db", db).exit_code == 0
    assert invoke("export", root / "notes.csv", "--db", db).exit_code == 0
    assert victim.read_text() == "precious" and (root / "notes.csv.tmp").read_text() == "my own notes"
    assert pl.read_csv(root / "out.csv").height == 6
    assert oct((root / "out.csv").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    # a symlink at the target itself needs --force, and is then replaced, never written through
    os.symlink(victim, root / "link.csv")
    assert invoke("export", root / "link.csv", "--db", db).exit_code == 1
    assert invoke("export", root / "link.csv", "--db", db, "--force").exit_code == 0
    assert victim.read_text() == "precious" and not (root / "link.csv").is_symlink()
    assert not list(root.glob(".*.tmp"))


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_evaluate_outputs_replace_planted_symlinks_instead_of_following_them(trained):
    root, db = trained
    out = root / "eval"
    out.mkdir()
    victim = root / "victim.txt"
    victim.write_text("precious")
    for name in ("metrics.json", "confusion_val.png"):
        os.symlink(victim, out / name)
    assert invoke("evaluate", "--db", db, "--out", out).exit_code == 0
    assert victim.read_text() == "precious"
    assert not (out / "metrics.json").is_symlink() and json.loads((out / "metrics.json").read_text())["validation"]


def test_heads_are_published_whole_while_readers_read(trained):
    """Retraining swaps the heads folder in one step; a reader never sees half of two trainings."""
    root, db = trained
    link = Store(db).heads_folder()
    first = link.resolve()
    assert link.is_symlink() and (first / "ensemble.json").exists()
    assert invoke("train-heads", "--db", db, "--heads", "probe", "--folds", 2).exit_code == 0
    second = link.resolve()
    assert second != first and first.exists()  # the previous generation stays for readers that opened it
    assert invoke("train-heads", "--db", db, "--heads", "knn", "--folds", 2).exit_code == 0
    assert not first.exists() and second.exists()  # older ones go
    assert json.loads((link / "ensemble.json").read_text())["weights"].keys() == {"knn"}
    assert invoke("evaluate", "--db", db, "--out", root / "e").exit_code == 0


# ---- guard rails ---------------------------------------------------------------------------------------
@pytest.fixture
def read_only(trained):
    """The trained store made unwritable (root ignores permission bits, so root uses the immutable flag)."""
    root, db = trained
    files = ["find", str(db), "(", "-type", "f", "-o", "-type", "d", ")", "-exec"]  # chattr refuses symlinks
    if os.geteuid() != 0:
        make, undo = ["chmod", "-R", "a-w", str(db)], ["chmod", "-R", "u+w", str(db)]
    else:
        make, undo = files + ["chattr", "+i", "{}", "+"], files + ["chattr", "-i", "{}", "+"]
    try:
        if subprocess.run(make, capture_output=True).returncode != 0:
            pytest.skip("can't make a folder read-only here (root without the immutable flag)")
        yield root, db
    finally:
        subprocess.run(undo, capture_output=True)


def test_a_read_only_store_fails_clearly_before_work_and_still_reads(read_only):
    root, db = read_only
    result = invoke("train-heads", "--db", db, "--heads", "probe", "--folds", 2)
    assert result.exit_code == 1 and "not writable" in result.output and "fitting" not in result.output
    for args in (("predict",), ("index", root / "lab")):
        result = invoke(*args, "--db", db)
        assert result.exit_code == 1 and "not writable" in result.output, result.output
    assert invoke("info", "--db", db).exit_code == 0
    assert invoke("export", root / "x.csv", "--db", db).exit_code == 0
    assert invoke("neighbors", root / "lab" / "red" / "000.png", "--db", db).exit_code == 0


def test_storage_errors_are_one_line_messages(tmp_path):
    from clipfuse.store.store import _storage_message

    message = _storage_message("s.lance", RuntimeError(
        'lance error: LanceError(IO): Operation not permitted (os error 1) at path "/s.lance/t.lance/data/.tmpx", '
        '/root/.cargo/registry/src/lance-io-13.0.0/src/object_store.rs:1006:34'))
    assert "\n" not in message and ".rs:" not in message and "not writable" in message


def test_command_line_mistakes_exit_2(trained, tmp_path):
    root, db = trained
    (tmp_path / "afile").write_text("x")
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "open_clip_model.safetensors").write_bytes(b"")
    (ft / "clipfuse.json").write_text("{}")
    cases = {
        "--alphas": ("wise-ft", "--checkpoint", ft, "--db", db, "--alphas", "0:1:-1"),
        "--version": ("predict", "--db", db, "--version", "zzz"),
        "--device": ("index", root / "lab", "--db", db, "--device", "cuda"),
        "--precision": ("index", root / "lab", "--db", db, "--precision", "fp16", "--device", "cpu"),
        "--heads": ("predict", "--db", db, "--heads", "nosuch"),
        "--db": ("info", "--db", tmp_path / "afile"),
        "IMAGE_OR_ID": ("neighbors", root / "nope.png", "--db", db),
    }
    for option, args in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2 and option in plain(result), (option, result.output)


def test_symlinked_class_folders_are_reported_not_followed(tmp_path, tiny_model):
    write_shapes_folder(tmp_path / "lab", n_per_class=3)
    os.symlink("..", tmp_path / "lab" / "zloop")
    os.symlink(tmp_path / "lab" / "red", tmp_path / "lab" / "blue" / "nested")
    db = tmp_path / "s.lance"
    result = invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model)
    assert result.exit_code == 0
    out = " ".join(result.output.split())
    assert "zloop: symbolic link to a folder: not followed" in out and "nested: symbolic link" in out
    info = json.loads(invoke("info", "--db", db, "--json").output)
    assert info["images"] == 9 and info["per_class"] == {"blue": 3, "green": 3, "red": 3}


def test_degenerate_labels_say_what_is_missing(tmp_path, tiny_model):
    one = tmp_path / "one"
    write_shapes_folder(tmp_path / "three", n_per_class=1)
    write_shapes_folder(one, n_per_class=3)
    for c in ("green", "blue"):
        for f in (one / c).iterdir():
            f.unlink()
        (one / c).rmdir()
    db = tmp_path / "a.lance"
    assert invoke("index", one, "--db", db, "--model", tiny_model).exit_code == 0
    result = invoke("train-heads", "--db", db)
    assert result.exit_code == 1 and "only one class ('red')" in plain(result) and "1.000" not in result.output
    db = tmp_path / "b.lance"
    assert invoke("index", tmp_path / "three", "--db", db, "--model", tiny_model).exit_code == 0
    result = invoke("finetune", "--out", tmp_path / "ft", "--epochs", 1, "--db", db)
    assert result.exit_code == 1 and "single labeled image" in plain(result) and "nan" not in result.output
    assert not (tmp_path / "ft").exists()
    # one label per class: train-heads runs, says nothing was held out, and evaluate says so too
    result = invoke("train-heads", "--db", db, "--heads", "probe,knn,propagation")
    assert result.exit_code == 0, result.output
    assert "one per class" in plain(result) and "nan" not in result.output
    assert invoke("predict", "--db", db).exit_code == 0
    result = invoke("evaluate", "--db", db, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "no held-out labels" in plain(result) and "graph head alone" in plain(result)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["fusion"]["rule"] == "graph-head" and report["validation"]["fused"]["n"] == 0


def test_import_reports_duplicates_keeps_paths_inside_the_root_and_ids_with_slashes_work(tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "v.npy", rng.normal(size=(6, 8)).astype(np.float32))
    pl.DataFrame({"id": ["train/0001", "b", "c", "d", "d", "f"],
                  "path": ["p/1.png", "p/2.png", "p/3.png", "p/4.png", "p/5.png", "p/2.png"]}).write_csv(
        tmp_path / "rows.csv")
    db = tmp_path / "s.lance"
    result = invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv", "--db", db,
                    "--image-root", tmp_path)
    assert result.exit_code == 0, result.output
    out = plain(result)
    assert "1 row(s) repeat a content id" in out and "1 came with a different vector" in out
    assert "1 repeat a path" in out
    hit = json.loads(invoke("neighbors", "train/0001", "--db", db, "-k", 1, "--json").output)
    assert hit["neighbors"][0]["id"] == "train/0001"
    pl.DataFrame({"id": ["x"], "path": ["../../etc/passwd"]}).write_csv(tmp_path / "escape.csv")
    np.save(tmp_path / "one.npy", np.ones((1, 8), dtype=np.float32))
    result = invoke("import-embeddings", tmp_path / "one.npy", "--metadata", tmp_path / "escape.csv", "--db",
                    tmp_path / "e.lance", "--image-root", tmp_path / "images")
    assert result.exit_code == 1 and "lead out of --image-root" in plain(result)
    assert not (tmp_path / "e.lance").exists()


def test_another_model_becoming_active_is_said_and_train_heads_points_to_version(tmp_path, tiny_model,
                                                                                 other_tiny_model):
    write_shapes_folder(tmp_path / "lab", n_per_class=3)
    write_shapes_folder(tmp_path / "pool", n_per_class=1, seed=3)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model).exit_code == 0
    first = Store(db).get_version().fingerprint
    result = invoke("index", "--unlabeled", tmp_path / "pool", "--db", db, "--model", other_tiny_model)
    out = plain(result)
    assert result.exit_code == 0 and "is now the active version" in out and f"--version {first[:12]}" in out
    result = invoke("train-heads", "--db", db)
    assert result.exit_code == 1 and "no labeled images" in plain(result) and first[:12] in plain(result)


def test_heic_and_avif_are_read_and_raw_files_reported(tmp_path, tiny_model):
    from PIL import Image
    from pillow_heif import register_heif_opener

    register_heif_opener()  # to write the test file

    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    pool = tmp_path / "pool"
    pool.mkdir()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    photo.save(pool / "phone.heic", format="HEIF")
    photo.save(pool / "web.avif", format="AVIF")
    (pool / "camera.CR2").write_bytes(b"II*\0raw")
    db = tmp_path / "s.lance"
    result = invoke("index", tmp_path / "lab", "--unlabeled", pool, "--db", db, "--model", tiny_model)
    assert result.exit_code == 0, result.output
    paths = {Path(p).name for p in Store(db).images()["path"].to_pylist()}
    assert {"phone.heic", "web.avif"} <= paths
    errors = json.loads(invoke("info", "--db", db, "--errors", "--json").output)["error_list"]
    assert [(Path(e["path"]).name, "camera RAW" in e["reason"]) for e in errors] == [("camera.CR2", True)]


def test_a_failed_first_index_leaves_no_store_behind(tmp_path, shapes_dir):
    db = tmp_path / "s.lance"
    result = invoke("index", shapes_dir, "--db", db, "--model", "timm:test_efficientnet",
                    "--pretrained", tmp_path / "missing.safetensors")
    assert result.exit_code == 1 and not db.exists()


def test_evaluate_says_how_many_test_images_it_skipped(trained):
    from PIL import Image

    root, db = trained
    for split in ("lab2/yellow", "test2/yellow"):
        (root / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (48, 48), (230, 220, 20 + 40 * i + len(split))).save(root / split / f"{i}.png")
    assert invoke("index", root / "lab2", "--test", root / "test2", "--db", db).exit_code == 0
    result = invoke("evaluate", "--db", db, "--out", root / "ev")
    assert result.exit_code == 0 and "2 labeled test image(s) belong to classes added after" in plain(result)
    assert json.loads((root / "ev" / "metrics.json").read_text())["test_skipped_new_classes"] == 2


def test_rerunning_a_finished_reembed_names_the_version_it_replaced(trained, embedder):
    from clipfuse.train import model_config, save_model_folder

    root, db = trained
    base = Store(db).get_version().fingerprint
    folder = save_model_folder(root / "ft", embedder.model, model_config(embedder.config.model, embedder.model),
                               meta={"kind": "finetuned", "base_fingerprint": base})
    first = invoke("reembed", "--model-checkpoint", folder, "--db", db)
    again = invoke("reembed", "--model-checkpoint", folder, "--db", db)
    new = Store(db).get_version().fingerprint
    assert new != base and first.exit_code == again.exit_code == 0
    for result in (first, again):
        out = plain(result)
        assert f"previous version {base[:12]} is kept" in out and f"previous version {new[:12]}" not in out


# ---- found by a hostile review of the fixes above ------------------------------------------------------
def test_the_lock_file_is_never_followed_or_written_through(tmp_path):
    db = tmp_path / "s.lance"
    db.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, db / "_writer.lock")
    with pytest.raises(OSError, match="symbolic link"):
        with Store(db).writer():
            pass
    assert victim.read_text() == "precious"
    (db / "_writer.lock").unlink()
    os.symlink(tmp_path / "nowhere", db / "_writer.lock")  # dangling: nothing may be created there
    with pytest.raises(OSError, match="symbolic link"):
        with Store(db).writer():
            pass
    assert not (tmp_path / "nowhere").exists()
    (db / "_writer.lock").unlink()
    os.mkfifo(db / "_writer.lock")
    with pytest.raises(OSError, match="not a regular file"):
        with Store(db).writer():
            pass


def test_a_holder_whose_lock_file_is_deleted_stops_and_a_waiter_locks_the_new_one(tmp_path):
    store = Store(tmp_path / "s.lance")
    with store.writer("first"):
        os.unlink(tmp_path / "s.lance" / "_writer.lock")  # "stale", thinks a user
        with pytest.raises(OSError, match="was removed or replaced while this command held it"):
            store.add_classes(["a"])
    assert store.classes() == []
    got = []

    def wait_then_hold():
        with Store(store.uri, lock_timeout=30).writer("waiter"):
            got.append(True)
            probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                     "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
                     "except OSError:\n    print('held')\n")
            out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "s.lance" / "_writer.lock")],
                                 capture_output=True, text=True, timeout=60).stdout.strip()
            got.append(out)

    with _held_elsewhere(tmp_path / "s.lance", "holder"):
        waiter = threading.Thread(target=wait_then_hold)
        waiter.start()
        time.sleep(0.5)
        os.unlink(tmp_path / "s.lance" / "_writer.lock")
    waiter.join(60)
    assert got == [True, "held"]  # the waiter holds the lock file that is there now, not the deleted one


def test_file_uris_name_the_same_store_and_other_uris_are_refused(tmp_path, tiny_model, monkeypatch):
    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "s.lance"
    result = invoke("index", tmp_path / "lab", "--db", f"file://{db}", "--model", tiny_model)
    assert result.exit_code == 0, result.output
    assert (db / "_writer.lock").is_file() and not (tmp_path / "file:").exists()
    assert invoke("info", "--db", db).exit_code == 0
    assert invoke("info", "--db", f"file://localhost{db}").exit_code == 0  # RFC 8089: the same folder
    result = invoke("info", "--db", "https://example.com/store")  # object stores are s3://, gs://, az://
    assert result.exit_code == 2 and "looks like a URI" in plain(result)


def test_an_index_that_waited_lists_the_folders_again(tmp_path, tiny_model):
    """A run that waited for another writer must not remove rows of files that appeared meanwhile."""
    from PIL import Image

    pool = tmp_path / "pool"
    write_shapes_folder(pool, n_per_class=2)
    db = tmp_path / "s.lance"
    assert invoke("index", "--unlabeled", pool, "--db", db, "--model", tiny_model).exit_code == 0
    with _held_elsewhere(db, "a long writer"):
        out = _Output(subprocess.Popen(CLIPFUSE + ["index", "--unlabeled", str(pool), "--db", str(db)],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        out.wait_for("being written by")
        Image.new("RGB", (48, 48), (250, 250, 0)).save(pool / "red" / "new.png")  # appears while it waits
    assert "indexed 1 new, 6 unchanged" in out.finish()
    assert Store(db).images().num_rows == 7


def test_export_streams_into_devices_and_fifos_and_refuses_folders(trained):
    root, db = trained
    proc = subprocess.run(CLIPFUSE + ["export", "/dev/stdout", "--db", str(db)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("path,id,label,confidence"), proc.stderr
    assert os.path.islink("/dev/stdout")  # written into, never replaced
    assert invoke("export", "/dev/null", "--db", db, "--force").exit_code == 0
    assert Path("/dev/null").is_char_device()
    os.mkfifo(root / "pipe.csv")
    received = []
    reader = threading.Thread(target=lambda: received.append((root / "pipe.csv").read_text()))
    reader.start()
    assert invoke("export", root / "pipe.csv", "--db", db).exit_code == 0
    reader.join(30)
    assert received[0].startswith("path,id,label") and (root / "pipe.csv").is_fifo()
    result = invoke("export", "/dev/clipfuse-nothing.csv", "--db", db)
    assert result.exit_code == 2 and "writes no files into /dev" in plain(result)


def test_a_model_that_makes_nan_fails_before_anything_is_written(tmp_path, tiny_model, shapes_dir):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_model.removeprefix("local-dir:"), folder)
    state = load_file(str(folder / "open_clip_model.safetensors"))
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    db = tmp_path / "s.lance"
    result = invoke("index", shapes_dir, "--db", db, "--model", f"local-dir:{folder}")
    assert result.exit_code == 1 and "NaN or infinite" in result.output and "Traceback" not in result.output
    assert not db.exists()
    store = Store(tmp_path / "t.lance")
    store.register_version({"fingerprint": "f" * 16, "model": "m", "dim": 4})
    with pytest.raises(ValueError, match="NaN or infinite"):
        store.add_embeddings("f" * 16, ["a"], np.full((1, 4), np.nan, dtype=np.float32))


def test_more_command_line_mistakes_exit_2(trained, tmp_path):
    root, db = trained
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "open_clip_model.safetensors").write_bytes(b"")
    (ft / "clipfuse.json").write_text("{}")
    for args, option in (
        (("wise-ft", "--checkpoint", ft, "--db", db, "--alphas", "nan"), "--alphas"),
        (("wise-ft", "--checkpoint", ft, "--db", db, "--alphas", "0:1:1e-9"), "--alphas"),
        (("wise-ft", "--checkpoint", ft, "--db", db, "--alphas", "0:1:1e-310"), "--alphas"),  # overflowed to inf
        (("wise-ft", "--checkpoint", ft, "--db", db, "--alphas", "1:0:0.1"), "start above where they stop"),
        (("info", "--db", "memory://x"), "in-memory stores live only inside one Python process"),
        (("info", "--db", "file://tmp/x"), "names the host 'tmp'"),
        (("index", root / "lab", "--db", db, "--device", "meta"), "--device"),
        (("index", root / "lab", "--db", db, "--device", "mps"), "--device"),
        (("predict", "--db", db, "--heads", ","), "--heads"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2 and option in plain(result), (args, result.output)


def test_an_empty_import_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((0, 16), dtype=np.float32))
    pl.DataFrame({"id": []}, schema={"id": pl.String}).write_csv(tmp_path / "rows.csv")
    result = invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv", "--db",
                    tmp_path / "s.lance")
    assert result.exit_code == 1 and "at least one image" in plain(result) and not (tmp_path / "s.lance").exists()


def test_finetune_never_replaces_a_folder_of_other_files(trained):
    root, db = trained
    out = root / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    result = invoke("finetune", "--db", db, "--out", out, "--epochs", 1)
    assert result.exit_code == 1 and "clipfuse model doesn't have (sub, thesis.txt)" in plain(result)
    assert "epoch" not in result.output
    assert (out / "thesis.txt").read_text() == "years of work" and (out / "sub").is_dir()


def test_a_reader_saves_the_neighbour_index_only_when_no_writer_holds_the_store(trained):
    root, db = trained
    with _held_elsewhere(db, "a writer"):
        result = invoke("neighbors", root / "lab" / "red" / "000.png", "--db", db, "--ann", "-k", 2)
        assert result.exit_code == 0, result.output
        assert not list((db / "_ann").glob("*.hnsw"))  # not saved while a writer holds the store
    assert invoke("neighbors", root / "lab" / "red" / "000.png", "--db", db, "--ann", "-k", 2).exit_code == 0
    assert len(list((db / "_ann").glob("*.hnsw"))) == 1


def test_classes_that_old_writers_gave_one_index_are_counted_and_renumbered(tmp_path, tiny_model):
    import pyarrow as pa

    write_shapes_folder(tmp_path / "lab", n_per_class=2)
    db = tmp_path / "s.lance"
    assert invoke("index", tmp_path / "lab", "--db", db, "--model", tiny_model).exit_code == 0
    table = Store(db).db.open_table("classes")
    table.add(pa.table({"index": pa.array([2], pa.int32()), "name": ["yellow"]}))  # index 2 is red's
    assert Store(db).classes() == ["blue", "green", "red", "yellow"]
    assert Store(db).duplicates()["classes"] == 1
    Store(db).repair()
    assert sorted(raw_rows(db, "classes")["index"].to_list()) == [0, 1, 2, 3]
    assert Store(db).classes() == ["blue", "green", "red", "yellow"]


# ---- found by a second hostile review ---------------------------------------------------------------------
_PROBE_LOCK = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
               "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
               "except OSError:\n    print('held')\n")


def _probe(lock: Path) -> str:
    """'held' or 'free', as another process sees the lock."""
    return subprocess.run([sys.executable, "-c", _PROBE_LOCK, str(lock)], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def test_reading_the_lock_file_inside_the_holder_keeps_the_lock(tmp_path):
    """An image symlinked to the lock file was read (opened, closed) by the holder, which dropped a POSIX lock."""
    from clipfuse.embed import read_image

    db = tmp_path / "s.lance"
    os.symlink(db / "_writer.lock", tmp_path / "lock.png")
    with Store(db).writer("holder"):
        assert read_image(tmp_path / "lock.png")[1] is None  # not an image: read, and closed
        (db / "_writer.lock").read_bytes()
        assert _probe(db / "_writer.lock") == "held"
    assert _probe(db / "_writer.lock") == "free"


def test_a_hard_linked_lock_file_is_refused_and_its_other_name_kept(tmp_path):
    db = tmp_path / "s.lance"
    db.mkdir()
    (tmp_path / "notes.txt").write_text("important notes")
    os.link(tmp_path / "notes.txt", db / "_writer.lock")
    with pytest.raises(OSError, match="hard links"):
        with Store(db).writer():
            pass
    assert (tmp_path / "notes.txt").read_text() == "important notes"


def test_a_lock_file_replaced_by_a_folder_while_waiting_is_a_clear_error(tmp_path):
    db = tmp_path / "s.lance"
    # the waiter must be a separate process to be waiting on the file itself
    script = ("import sys\nfrom clipfuse.store import Store\n"
              "def told(holder):\n    print('waiting for', holder, flush=True)\n"
              "try:\n    with Store(sys.argv[1], lock_timeout=60, on_lock_wait=told).writer('waiter'):\n"
              "        print('got it')\nexcept OSError as e:\n    print('error:', e)\n")
    with _held_elsewhere(db, "holder"):
        proc = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE, text=True)
        waiting = _Output(proc)
        waiting.wait_for("waiting for holder")
        os.unlink(db / "_writer.lock")
        (db / "_writer.lock").mkdir()
    out = waiting.finish(60)  # the script reports the error and exits 0
    assert "is a folder, so it can't be the store's writer lock" in out, out


def test_export_to_stdout_appends_and_keeps_the_summary_apart(trained):
    root, db = trained
    log = root / "log.txt"
    log.write_text("kept line\n")
    with open(log, "a") as f:
        proc = subprocess.run(CLIPFUSE + ["export", "/dev/stdout", "--db", str(db)], stdout=f,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "kept line" and lines[1].startswith("path,id,label") and len(lines) == 2 + 6
    assert "wrote 6 rows" in proc.stderr


def test_symlinks_through_proc_or_relative_hops_are_outputs_like_any_other(trained):
    root, db = trained
    victim = root / "victim.txt"
    victim.write_text("precious")
    os.symlink(f"/proc/self/root{victim}", root / "plink.csv")
    (root / "real" / "sub").mkdir(parents=True)
    os.symlink("real/sub", root / "dir")
    (root / "real" / "target").write_text("keep me")
    os.symlink("../target", root / "real" / "sub" / "out")
    os.symlink("/dev/null", root / "target")  # what a lexical reading of dir/out would reach
    for target in (root / "plink.csv", root / "dir" / "out"):
        assert invoke("export", target, "--db", db).exit_code == 1  # exists: --force first
        assert invoke("export", target, "--db", db, "--force").exit_code == 0
        assert not target.is_symlink()  # the link was replaced, its target never written
    assert victim.read_text() == "precious" and (root / "real" / "target").read_text() == "keep me"
    os.symlink("/dev", root / "devlink")
    result = invoke("export", root / "devlink" / "new.csv", "--db", db)
    assert result.exit_code == 2 and "writes no files into /dev" in plain(result)


def test_a_folder_with_a_stray_clipfuse_json_is_not_a_model_folder(trained):
    root, db = trained
    proj = root / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "clipfuse.json").write_text('{"my": "settings"}')
    (proj / "src" / "main.py").write_text("code")
    result = invoke("finetune", "--db", db, "--out", proj, "--epochs", 1)
    assert result.exit_code == 1 and "pass a new or empty folder" in plain(result)
    assert (proj / "src" / "main.py").read_text() == "code"


def test_a_class_recorded_under_two_indexes_counts_as_a_duplicate(tmp_path):
    import pyarrow as pa

    store = Store(tmp_path / "s.lance")
    store.add_classes(["a"])
    store.db.open_table("classes").add(pa.table({"index": pa.array([1], pa.int32()), "name": ["a"]}))
    assert store.duplicates()["classes"] == 1
    store.repair()
    assert raw_rows(tmp_path / "s.lance", "classes").height == 1


def test_rerunning_a_first_index_killed_before_it_finished_resumes_with_its_model(tmp_path, embedder, shapes_dir):
    db = tmp_path / "s.lance"
    Store(db).register_version(embedder.info.to_dict())  # what a first run killed before its end leaves
    result = invoke("index", shapes_dir, "--db", db)  # no --model: the version it was writing
    assert result.exit_code == 0, result.output
    assert Store(db).get_version().fingerprint == embedder.fingerprint
