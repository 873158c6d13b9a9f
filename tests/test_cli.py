"""The command line, end to end on the tiny model: exit codes, messages, outputs."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from clipfuse.cli import app
from clipfuse.store import Store
from conftest import write_mixed_folder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def plain(result) -> str:
    """A command's output as one line of words, without the frame typer draws around usage errors."""
    return " ".join(result.output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


@pytest.fixture
def indexed(tmp_path, tiny_model, shapes_dir):
    db = tmp_path / "store.lance"
    result = invoke("index", shapes_dir, "--db", db, "--model", tiny_model, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    return db


def test_index_summary_and_reindex(indexed, shapes_dir):
    result = invoke("index", shapes_dir, "--db", indexed)  # the store's model is reused
    assert result.exit_code == 0, result.output
    assert "indexed 0 new, 12 unchanged, 0 duplicates, 0 errors" in result.output


def test_index_awkward_folder_lists_bad_files_and_exits_zero(tmp_path, tiny_model):
    files = write_mixed_folder(tmp_path / "mixed")
    db = tmp_path / "db"
    result = invoke("index", "--unlabeled", tmp_path / "mixed", "--db", db, "--model", tiny_model)
    assert result.exit_code == 0, result.output
    assert f"indexed {len(files['good'])} new" in result.output
    for word in ("truncated", "empty file", "not an image"):
        assert word in result.output
    info = invoke("info", "--db", db, "--errors", "--json")
    listed = {e["path"] for e in json.loads(info.output)["error_list"]}
    assert listed == {str(p) for p in files["bad"]}
    paths = set(Store(db).images()["path"].to_pylist())
    assert paths == {str(p) for p in files["good"]}  # the non-ASCII name among them


def test_neighbors_of_indexed_image_is_itself(indexed, shapes_dir):
    query = shapes_dir / "green" / "002.png"
    result = invoke("neighbors", query, "-k", 4, "--db", indexed, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    first = out["neighbors"][0]
    assert first["paths"] == [str(query)] and first["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert len(out["neighbors"]) == 4
    by_id = invoke("neighbors", first["id"], "-k", 1, "--db", indexed, "--json")
    assert json.loads(by_id.output)["neighbors"][0]["id"] == first["id"]
    table = invoke("neighbors", query, "--db", indexed)
    assert table.exit_code == 0 and "similarity" in table.output and "green" in table.output


def test_neighbors_of_new_image_and_text(indexed, tmp_path, shapes_dir):
    from PIL import Image

    new = tmp_path / "new.png"
    Image.open(shapes_dir / "red" / "001.png").rotate(90).save(new)
    result = invoke("neighbors", new, "-k", 2, "--db", indexed, "--json")
    assert result.exit_code == 0, result.output
    assert "embedded now" in json.loads(result.output)["query"]
    text = invoke("neighbors", "--text", "a red circle", "-k", 3, "--db", indexed, "--json")
    assert text.exit_code == 0 and len(json.loads(text.output)["neighbors"]) == 3


def test_neighbors_with_another_model_fails_clearly(indexed, shapes_dir, other_tiny_model):
    result = invoke("neighbors", shapes_dir / "red" / "000.png", "--db", indexed, "--model", other_tiny_model)
    assert result.exit_code == 1
    assert "did not make embedding version" in result.output and "--version" in result.output


def test_usage_and_runtime_errors(tmp_path, indexed):
    assert invoke("index").exit_code == 2
    assert invoke("index", tmp_path / "nope").exit_code == 2
    assert invoke("neighbors", "--db", indexed).exit_code == 2
    assert invoke("neighbors", "-k", 0, "x", "--db", indexed).exit_code == 2
    missing = invoke("neighbors", "0" * 32, "--db", indexed)
    assert missing.exit_code == 1 and "has no vector" in missing.output
    no_store = invoke("info", "--db", tmp_path / "absent.lance")
    assert no_store.exit_code == 1 and "clipfuse index" in no_store.output
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"")
    loose = invoke("index", flat, "--db", tmp_path / "x.lance")
    assert loose.exit_code == 1 and "one sub-folder per class" in loose.output
    wrong_version = invoke("neighbors", "x", "--db", indexed, "--version", "zzz")
    assert wrong_version.exit_code == 2 and "matches none" in plain(wrong_version)  # a command-line mistake


def test_info_lists_versions_and_classes(indexed):
    result = invoke("info", "--db", indexed, "--json")
    info = json.loads(result.output)
    assert info["images"] == 12 and info["per_class"] == {"blue": 4, "green": 4, "red": 4}
    assert len(info["versions"]) == 1 and info["versions"][0]["fingerprint"] == info["active"]
    assert invoke("info", "--db", indexed).exit_code == 0


def test_import_clip_retrieval_round_trip(indexed, tmp_path, tiny_model):
    original = Store(indexed).load_embeddings()
    paths = {r["id"]: r["path"] for r in Store(indexed).images().to_pylist()}
    out = tmp_path / "clip_out"
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    half = len(original.ids) // 2  # two shards, as clip-retrieval writes them
    for shard, rows in enumerate((slice(0, half), slice(half, None))):
        np.save(out / "img_emb" / f"img_emb_{shard}.npy", original.X[rows].astype(np.float16))
        pl.DataFrame({"image_path": [paths[i] for i in original.ids[rows]]}).write_parquet(
            out / "metadata" / f"metadata_{shard}.parquet")
    db = tmp_path / "imported.lance"
    result = invoke("import-embeddings", out, "--db", db)
    assert result.exit_code == 0, result.output
    imported = Store(db).load_embeddings()
    assert sorted(imported.ids) == sorted(original.ids)  # ids are content hashes of the files
    order = np.argsort(imported.ids)
    np.testing.assert_allclose(imported.X[order], original.X[np.argsort(original.ids)], atol=2e-3)

    # Claiming the model that made them keeps the fingerprint, so text queries work.
    db2 = tmp_path / "imported2.lance"
    result = invoke("import-embeddings", out, "--db", db2, "--model", tiny_model)
    assert result.exit_code == 0, result.output
    assert Store(db2).get_version().fingerprint == original.fingerprint
    assert invoke("neighbors", "--text", "a blue circle", "--db", db2).exit_code == 0


def test_import_generic_npy_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    pl.DataFrame({"id": [f"img{i}" for i in range(6)], "label": ["a", "b", "a", None, None, None]}).write_csv(
        tmp_path / "rows.csv")
    db = tmp_path / "db"
    result = invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv", "--db", db)
    assert result.exit_code == 0, result.output
    es = Store(db).load_embeddings()
    assert es.classes == ["a", "b"] and sorted(es.labels.tolist()) == [-1, -1, -1, 0, 0, 1]
    np.testing.assert_allclose(np.linalg.norm(es.X, axis=1), 1.0, atol=1e-6)
    result = invoke("neighbors", "img0", "-k", 1, "--db", db, "--json")
    assert json.loads(result.output)["neighbors"][0]["id"] == "img0"
    text = invoke("neighbors", "--text", "x", "--db", db)
    assert text.exit_code == 1 and "imported without a model" in text.output
    # Mismatched row counts and a missing --metadata are clear errors.
    np.save(tmp_path / "w.npy", X[:5])
    bad = invoke("import-embeddings", tmp_path / "w.npy", "--metadata", tmp_path / "rows.csv", "--db", db)
    assert bad.exit_code == 1 and "5 vectors but rows.csv has 6 rows" in bad.output
    assert invoke("import-embeddings", tmp_path / "v.npy", "--db", db).exit_code == 2


def test_bad_values_and_unreadable_inputs(tmp_path, indexed, shapes_dir):
    np.save(tmp_path / "v.npy", np.ones((2, 4), dtype=np.float32))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    bad = invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "bad.parquet", "--db", indexed)
    assert bad.exit_code == 1 and "can't read metadata file" in bad.output
    pl.DataFrame({"id": ["a", "b"]}).write_csv(tmp_path / "rows.csv")
    assert invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv",
                  "--split", "bogus").exit_code == 2
    assert invoke("index", shapes_dir, "--db", indexed, "--precision", "fp64").exit_code == 2
    unknown = invoke("index", shapes_dir, "--db", tmp_path / "n.lance", "--model", "NoSuchModel",
                     "--allow-random-weights")
    assert unknown.exit_code == 1 and "unknown open_clip model 'NoSuchModel'" in unknown.output
    (tmp_path / "afile").write_text("x")
    as_file = invoke("info", "--db", tmp_path / "afile")
    assert as_file.exit_code == 2 and "is a file" in plain(as_file)


# ---- classifier stack -------------------------------------------------------------------------
@pytest.fixture
def three_splits(tmp_path, tiny_model):
    """A store with labeled (8 per class), unlabeled (6 per class) and labeled test (3 per class) shapes."""
    from conftest import write_shapes_folder

    write_shapes_folder(tmp_path / "labeled", n_per_class=8, seed=0)
    write_shapes_folder(tmp_path / "unlabeled", n_per_class=6, seed=1)
    write_shapes_folder(tmp_path / "test", n_per_class=3, seed=2)
    db = tmp_path / "store.lance"
    result = invoke("index", tmp_path / "labeled", "--unlabeled", tmp_path / "unlabeled", "--test",
                    tmp_path / "test", "--db", db, "--model", tiny_model)
    assert result.exit_code == 0, result.output
    return tmp_path, db


def test_train_predict_evaluate_export(three_splits):
    root, db = three_splits
    result = invoke("train-heads", "--db", db, "--folds", 3)
    assert result.exit_code == 0, result.output
    for head in ("zero-shot", "probe", "knn", "propagation", "kmeans", "pseudo", "mean-teacher", "fused"):
        # a scored row of the validation table (a skipped head would only be named in a "skipped" line)
        assert re.search(rf"^\W*{re.escape(head)}\s*│\s*[01]\.\d{{3}}\s*│", result.output, re.M), head
    assert re.findall(r"^(\S+) skipped:", result.output, re.M) == ["finetuned"]  # no finetuned model here
    assert "fused validation accuracy" in result.output
    store = Store(db)
    folder = store.heads_folder()
    config = json.loads((folder / "config.json").read_text())
    assert config["n_folds"] == 3 and config["classes"] == ["blue", "green", "red"] and config["text_embeddings"]
    assert (folder / "ensemble.safetensors").exists() and (folder / "fit_ids.npy").exists()

    result = invoke("predict", "--db", db)
    assert result.exit_code == 0, result.output
    predictions = store.predictions()
    assert predictions.num_rows == 24 + 18 + 9
    assert {"id", "label", "confidence", "probs"} <= set(predictions.column_names)
    assert not [c for c in predictions.column_names if c.startswith("probs_")]  # per-head columns are opt-in
    assert invoke("predict", "--db", db, "--per-head").exit_code == 0
    assert {"probs_propagation", "probs_zero_shot"} <= set(store.predictions().column_names)
    probs = predictions["probs"].combine_chunks().flatten().to_numpy().reshape(-1, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    out = root / "eval"
    result = invoke("evaluate", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]) >= {"propagation", "fused"}
    assert metrics["test"]["n"] == 9  # the labeled test folder is scored from the predictions
    for png in ("confusion_val.png", "class_similarity.png", "confusion_test.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    csv = root / "predictions.csv"
    result = invoke("export", csv, "--db", db)
    assert result.exit_code == 0, result.output
    df = pl.read_csv(csv)
    assert df.columns == ["path", "id", "label", "confidence", "ood"] and df.height == 18
    assert df["ood"].null_count() == 0 and df["ood"].min() >= 0 and df["ood"].max() <= 1
    assert set(df["label"]) <= {"blue", "green", "red"}
    assert all("/unlabeled/" in p for p in df["path"])
    refused = invoke("export", csv, "--db", db, "--split", "test", "--probs")
    assert refused.exit_code == 1 and "--force" in refused.output
    assert pl.read_csv(csv).height == 18  # the existing file is untouched
    result = invoke("export", csv, "--db", db, "--split", "test", "--probs", "--force")
    assert result.exit_code == 0, result.output
    df = pl.read_csv(csv)
    assert df.height == 9 and df.columns[-3:] == ["p_blue", "p_green", "p_red"]
    np.testing.assert_allclose(df.select(["p_blue", "p_green", "p_red"]).sum_horizontal(), 1.0, rtol=1e-5)


def test_predict_covers_images_indexed_after_training(three_splits):
    from conftest import write_shapes_folder

    root, db = three_splits
    assert invoke("train-heads", "--db", db, "--heads", "propagation,knn", "--folds", 2).exit_code == 0
    write_shapes_folder(root / "later", n_per_class=2, seed=9)
    assert invoke("index", "--unlabeled", root / "later", "--db", db).exit_code == 0
    result = invoke("predict", "--db", db)
    assert result.exit_code == 0, result.output
    assert "(6 new since train-heads)" in result.output
    assert Store(db).predictions().num_rows == 51 + 6


def test_heads_commands_explain_what_is_missing(three_splits, tmp_path):
    root, db = three_splits
    result = invoke("predict", "--db", db)
    assert result.exit_code == 1 and "run `clipfuse train-heads` first" in result.output
    result = invoke("export", tmp_path / "x.csv", "--db", db)
    assert result.exit_code == 1 and "run `clipfuse predict` first" in result.output
    result = invoke("train-heads", "--db", db, "--heads", "probe,magic")
    assert result.exit_code == 2 and "unknown head(s) magic" in result.output
    words = tmp_path / "words.yaml"
    words.write_text("red: [red circle, crimson disc]\npurple: violet\n")
    result = invoke("train-heads", "--db", db, "--class-words", words)
    assert result.exit_code == 1 and "purple" in result.output and "Known classes: blue, green, red" in result.output
    words.write_text("red: [red circle, crimson disc]\nblue: a blue ball\n")
    result = invoke("train-heads", "--db", db, "--class-words", words, "--heads", "zero-shot,probe", "--folds", 2)
    assert result.exit_code == 0, result.output
    assert "1 class(es) not in" in result.output and "green" in result.output


def test_imported_vectors_without_a_model_skip_zero_shot(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 8))
    X = np.vstack([centers[i % 2] + 0.1 * rng.normal(size=8) for i in range(40)]).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    labels = ["a" if i % 2 == 0 else "b" for i in range(10)] + [None] * 30
    pl.DataFrame({"id": [f"img{i}" for i in range(40)], "label": labels}).write_csv(tmp_path / "rows.csv")
    db = tmp_path / "db"
    assert invoke("import-embeddings", tmp_path / "v.npy", "--metadata", tmp_path / "rows.csv", "--db", db).exit_code == 0
    result = invoke("train-heads", "--db", db, "--folds", 2)
    assert result.exit_code == 0, result.output
    assert "zero-shot skipped" in result.output and "imported without a model" in result.output
    assert "fused validation accuracy 1.000" in result.output


def test_demo_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model):
    result = invoke("demo", "--workdir", tmp_path / "demo", "--model", tiny_model, "--unlabeled", 120)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long titles
    assert "accuracy on the 120 unlabeled demo images" in text and "wrote 120 rows (unlabeled)" in text
    assert re.search(r"fused validation accuracy [01]\.\d{3}", text) and "demo done: 270 images" in text
    assert pl.read_csv(tmp_path / "demo" / "predictions.csv").height == 120


def test_classes_added_after_training_keep_predict_and_export_working(three_splits):
    from PIL import Image

    root, db = three_splits
    assert invoke("train-heads", "--db", db, "--heads", "probe,propagation", "--folds", 2).exit_code == 0
    new_class = root / "more" / "yellow"
    new_class.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (48, 48), (230, 220, 20 + 10 * i)).save(new_class / f"{i}.png")
    assert invoke("index", root / "more", "--db", db).exit_code == 0
    assert Store(db).classes() == ["blue", "green", "red", "yellow"]
    result = invoke("predict", "--db", db)
    assert result.exit_code == 0, result.output
    assert "added since train-heads" in " ".join(result.output.split())
    table = Store(db).predictions()
    assert "yellow" in table["known_label"].to_pylist()
    result = invoke("export", root / "all.csv", "--db", db, "--split", "all", "--probs")
    assert result.exit_code == 0, result.output
    assert pl.read_csv(root / "all.csv").columns[-3:] == ["p_blue", "p_green", "p_red"]
    assert invoke("evaluate", "--db", db, "--out", root / "eval").exit_code == 0
    result = invoke("predict", "--db", db, "--heads", "probe,prop")
    assert result.exit_code == 2 and "unknown head(s) prop" in plain(result)


def test_retraining_replaces_the_saved_heads_whole(three_splits):
    root, db = three_splits
    assert invoke("train-heads", "--db", db, "--heads", "probe,knn", "--folds", 2).exit_code == 0
    folder = Store(db).heads_folder()
    assert invoke("train-heads", "--db", db, "--heads", "propagation", "--folds", 2).exit_code == 0
    assert json.loads((folder / "config.json").read_text())["heads"] == ["propagation"]
    assert not folder.with_name(folder.name + ".tmp").exists() and not folder.with_name(folder.name + ".old").exists()
    folder.rename(folder.with_name(folder.name + ".old"))  # as if killed between the two renames
    result = invoke("predict", "--db", db)
    assert result.exit_code == 0, result.output


def test_clip_and_image_only_versions_coexist(tmp_path, tiny_model, tiny_timm):
    from conftest import write_shapes_folder

    name, weights = tiny_timm
    write_shapes_folder(tmp_path / "labeled", n_per_class=8)
    db = tmp_path / "store.lance"
    assert invoke("index", tmp_path / "labeled", "--db", db, "--model", tiny_model).exit_code == 0
    result = invoke("index", tmp_path / "labeled", "--db", db, "--model", name, "--pretrained", weights)
    assert result.exit_code == 0, result.output
    versions = {v.model: v for v in Store(db).versions()}
    assert set(versions) == {tiny_model, name} and versions[name].dim == 256 and versions[tiny_model].dim == 16
    query = sorted((tmp_path / "labeled" / "red").glob("*.png"))[0]
    for model, v in versions.items():
        result = invoke("neighbors", query, "--db", db, "--version", v.fingerprint, "-k", 3, "--json")
        assert result.exit_code == 0, result.output
        found = json.loads(result.output)
        assert found["version"] == v.fingerprint and found["neighbors"][0]["similarity"] == pytest.approx(1, abs=1e-5)
        # a file not in the store is embedded with the version's own model (the timm one loads its weights file)
        query.with_name("copy.png").write_bytes(query.read_bytes() + b"\0")
        result = invoke("neighbors", query.with_name("copy.png"), "--db", db, "--version", v.fingerprint, "-k", 1)
        assert result.exit_code == 0 and "embedded now" in result.output, result.output
        query.with_name("copy.png").unlink()

        result = invoke("train-heads", "--db", db, "--version", v.fingerprint, "--folds", 2,
                        "--heads", "zero-shot,probe,knn,propagation")
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        if model == name:
            assert "zero-shot skipped: timm:test_efficientnet is an image-only backbone: it has no text tower" in text
        else:
            assert "zero-shot skipped" not in text
        assert "fused validation accuracy" in text

    result = invoke("neighbors", "--text", "a red circle", "--db", db, "--version", versions[name].fingerprint)
    assert result.exit_code == 1 and "image-only backbone with no text tower" in " ".join(result.output.split())
    assert invoke("neighbors", "--text", "a red circle", "--db", db,
                  "--version", versions[tiny_model].fingerprint).exit_code == 0


def test_demo_without_hub_access_falls_back_to_effnet_lite0(tmp_path, monkeypatch):
    """No CLIP weights reachable: the demo runs on the bundled EfficientNet-Lite0 and says so."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = invoke("demo", "--workdir", tmp_path / "demo", "--unlabeled", 60)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ViT-B-32 (laion2b_s34b_b79k) can't be loaded here" in text and "using effnet-lite0 instead" in text
    assert "model: effnet-lite0" in text and "RANDOM" not in text
    assert "zero-shot skipped: effnet-lite0 is an image-only backbone" in text
    assert "accuracy on the 60 unlabeled demo images" in text and "demo done" in text
    assert pl.read_csv(tmp_path / "demo" / "predictions.csv").height == 60
    assert Store(tmp_path / "demo" / "clipfuse.lance").get_version().model == "effnet-lite0"
