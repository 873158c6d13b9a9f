"""Cross-version ensembles (``--versions``), several word lists, confused class pairs, removing a version."""

from __future__ import annotations

import csv
import json

import numpy as np
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

import clipfuse
from clipfuse.cli import app
from clipfuse.classify import HeadsConfig, ViewRows, create_ensemble_from_config
from clipfuse.workspace import OptionError

N, DIM, CLASSES, LABELS, NOISE = 1200, 32, 8, 10, 2.0
HEADS = "probe,knn,propagation"


def _view(centres, y, seed):
    """The same images seen by one "model": the class centre plus this model's own noise."""
    rng = np.random.default_rng(seed)
    X = centres[y] + NOISE * rng.standard_normal((len(y), centres.shape[1]))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def views(tmp_path):
    """A store holding two versions (imported vectors) of the same 1,200 images, independent noise."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM))
    y = rng.integers(0, CLASSES, N)
    labels = np.full(N, -1)
    for c in range(CLASSES):
        labels[np.flatnonzero(y == c)[:LABELS]] = c
    ids = [f"img{i:05d}" for i in range(N)]
    meta = tmp_path / "rows.parquet"
    pl.DataFrame({"id": ids, "label": [None if c < 0 else f"c{c}" for c in labels]}).write_parquet(meta)
    ws = clipfuse.open(tmp_path / "store.lance")
    fps = []
    for seed in (1, 2):
        np.save(tmp_path / f"view{seed}.npy", _view(centres, y, seed))
        fps.append(ws.import_embeddings(tmp_path / f"view{seed}.npy", metadata=meta).fingerprint)
    ws.truth, ws.ids, ws.labels, ws.fps, ws.root = dict(zip(ids, y)), ids, labels, fps, tmp_path
    ws.centres, ws.y = centres, y
    return ws


def _accuracy(ws, table, rows=None) -> float:
    d = table.select(["id", "split", "label_index"]).to_pydict()
    keep = set(rows) if rows is not None else None
    hits = [li == ws.truth[i] for i, s, li in zip(d["id"], d["split"], d["label_index"])
            if s == "unlabeled" and (keep is None or i in keep)]
    return float(np.mean(hits))


def test_two_versions_fused_beat_each_alone(views):
    ws = views
    alone = {}
    for fp in ws.fps:
        ws.train_heads(version=fp, heads=HEADS, folds=2)
        ws.predict(version=fp)
        alone[fp] = _accuracy(ws, ws.store.predictions(fp))
    trained = ws.train_heads(versions=",".join(fp[:8] for fp in ws.fps), heads=HEADS, folds=2)
    assert trained.versions == ws.fps and trained.version == "+".join(ws.fps)
    shorts = [fp[:12] for fp in ws.fps]
    assert trained.heads == [f"{s}/{h}" for s in shorts for h in HEADS.split(",")]
    assert set(trained.version_scores) == set(shorts) and trained.missing == {}
    assert all(w >= 0 for w in trained.weights.values()) and sum(trained.weights.values()) > 0
    # both versions carry weight: the fusion uses each model
    assert all(sum(w for h, w in trained.weights.items() if h.startswith(s)) > 0.05 for s in shorts)
    predicted = ws.predict(versions=ws.fps)
    assert predicted.versions == ws.fps and predicted.images == N and predicted.new_since_training == 0
    fused = _accuracy(ws, ws.store.predictions(ws.fps[0], versions=ws.fps))
    assert fused >= max(alone.values()) + 0.05, (fused, alone)
    # the single versions' own heads and predictions are untouched by the ensemble
    assert _accuracy(ws, ws.store.predictions(ws.fps[0])) == alone[ws.fps[0]]


def test_ensemble_survives_reload_and_order_and_fails_clearly_without_its_versions(views, tmp_path):
    ws = views
    ws.train_heads(versions=ws.fps, heads=HEADS, folds=2)
    ws.predict(versions=ws.fps, per_head=True)
    first = ws.store.predictions(ws.fps[0], versions=ws.fps)
    again = clipfuse.open(ws.db)  # a new process would see the same
    again.predict(versions=list(reversed(ws.fps)), per_head=True)  # the same set of versions: the same ensemble
    second = again.store.predictions(ws.fps[1], versions=list(reversed(ws.fps)))
    assert first["id"].to_pylist() == second["id"].to_pylist()
    np.testing.assert_allclose(first["probs"].combine_chunks().flatten().to_numpy(),
                               second["probs"].combine_chunks().flatten().to_numpy(), atol=1e-6)
    short = ws.fps[1][:12]
    assert f"probs_{short}_probe" in first.column_names
    exported = again.export(tmp_path / "ens.csv", versions=ws.fps, split="all")
    rows = list(csv.DictReader(open(exported.path)))
    assert len(rows) == N and {r["label"] for r in rows} <= {f"c{c}" for c in range(CLASSES)}
    # removing a version the ensemble needs: a clear error naming it, for every command
    removed = again.remove_version(ws.fps[1][:8])
    assert removed.removed.fingerprint == ws.fps[1] and removed.ensembles == [f"{ws.fps[0][:12]},{short}"]
    assert any("needed version" in n.message for n in removed.notices)
    for call in (lambda: again.predict(versions=ws.fps), lambda: again.evaluate(versions=ws.fps, out=tmp_path / "e")):
        with pytest.raises(OptionError, match=f"version '{ws.fps[1]}' matches none") as e:
            call()
        assert e.value.option == "--versions"
    # the survivor keeps working alone
    ws.train_heads(version=ws.fps[0], heads="probe", folds=2)
    assert ws.predict(version=ws.fps[0]).images == N


def test_a_version_made_again_fails_the_saved_ensemble(views):
    ws = views
    ws.train_heads(versions=ws.fps, heads="probe", folds=2)
    ws.predict(versions=ws.fps)
    ws.remove_version(ws.fps[1])
    meta = ws.root / "rows.parquet"
    again = ws.import_embeddings(ws.root / "view2.npy", metadata=meta)  # same vectors: same fingerprint, new record
    assert again.fingerprint == ws.fps[1]
    with pytest.raises(ValueError, match=f"version {ws.fps[1][:12]} .* was made again since"):
        ws.predict(versions=ws.fps)
    with pytest.raises(ValueError, match="was made again since"):  # its predictions are stale too
        ws.export(ws.root / "stale.csv", versions=ws.fps)
    assert ws.store.predictions(ws.fps[0], versions=ws.fps) is None  # removing the version dropped them
    assert "was made again" in ws.info().ensembles[0]["stale"]


def test_a_version_missing_some_images_is_filled_from_the_others(views):
    ws = views
    # a third "model" that saw only the first 1,000 images (the last 200, unlabeled, came later)
    unlabeled = [i for i, c in zip(ws.ids, ws.labels) if c < 0]
    late = set(unlabeled[-200:])
    kept = [i for i in ws.ids if i not in late]
    X = _view(ws.centres, ws.y, 3)[[ws.ids.index(i) for i in kept]]
    np.save(ws.root / "view3.npy", X)
    pl.DataFrame({"id": kept, "label": [None if ws.labels[ws.ids.index(i)] < 0 else f"c{ws.labels[ws.ids.index(i)]}"
                                        for i in kept]}).write_parquet(ws.root / "rows3.parquet")
    third = ws.import_embeddings(ws.root / "view3.npy", metadata=ws.root / "rows3.parquet").fingerprint
    notes = []
    ws.on_notice = notes.append
    trained = ws.train_heads(versions=[ws.fps[0], third], heads=HEADS, folds=2)
    assert trained.missing == {third[:12]: 200}
    lacking = [n.message for n in trained.notices if "lacks 200 of the 1200 images" in n.message]
    assert lacking and third[:12] in lacking[0] and "import vectors for every image" in lacking[0]
    assert notes and notes[0].message == lacking[0]  # live, as it happened
    predicted = ws.predict(versions=[ws.fps[0], third], per_head=True)
    assert predicted.images == N and any("lacks 200" in n.message for n in predicted.notices)
    table = ws.store.predictions(ws.fps[0], versions=[ws.fps[0], third])
    d = table.to_pydict()
    third_probe = d[f"probs_{third[:12]}_probe"]  # null where the version lacks the image
    late_rows = [k for k, i in enumerate(d["id"]) if i in late]
    assert all(third_probe[k] is None for k in late_rows)
    assert sum(p is None for p in third_probe) == len(late_rows)
    assert all(0.0 <= v <= 1.0 for v in d["ood"])  # the first version holds every image: each has an OOD score
    assert ws.predict(versions=[ws.fps[0], third], per_head=True).images == N  # a second write of those columns
    with pytest.raises(OptionError, match="lack 200 of the images; add a head of version " + ws.fps[0][:12]) as e:
        ws.predict(versions=[ws.fps[0], third], heads=f"{third[:12]}/probe")  # nothing would answer the late ones
    assert e.value.option == "--heads"
    assert ws.predict(versions=[ws.fps[0], third], heads="probe").heads == [f"{ws.fps[0][:12]}/probe",
                                                                           f"{third[:12]}/probe"]
    fused = np.asarray(d["probs"], dtype=np.float32)
    assert np.isfinite(fused).all() and np.allclose(fused.sum(axis=1), 1, atol=1e-4)
    # the late images are predicted from the first version: as well as that version predicts them alone
    ws.train_heads(version=ws.fps[0], heads=HEADS, folds=2)
    ws.predict(version=ws.fps[0])
    alone = _accuracy(ws, ws.store.predictions(ws.fps[0]), rows=late)
    assert _accuracy(ws, table, rows=late) >= alone - 0.05 and alone > 0.5


def test_a_version_without_the_labels_of_a_class_is_refused_by_name(views):
    """A version made before a class's labeled images were indexed doesn't know that class: its
    heads would outvote the version that does (0.65 -> 0.32 on that class, measured), so it is refused."""
    ws = views
    c0_labeled = {i for i, c in zip(ws.ids, ws.labels) if c == 0}
    kept = [i for i in ws.ids if i not in c0_labeled]
    np.save(ws.root / "v5.npy", _view(ws.centres, ws.y, 5)[[ws.ids.index(i) for i in kept]])
    pl.DataFrame({"id": kept, "label": [None if ws.labels[ws.ids.index(i)] < 0 else f"c{ws.labels[ws.ids.index(i)]}"
                                        for i in kept]}).write_parquet(ws.root / "rows5.parquet")
    fifth = ws.import_embeddings(ws.root / "v5.npy", metadata=ws.root / "rows5.parquet").fingerprint
    with pytest.raises(ValueError, match=f"version {fifth[:12]} .* holds no labeled image of 1 class.*'c0'"):
        ws.train_heads(versions=[ws.fps[0], fifth], heads=HEADS, folds=2)
    assert crossversion_folder_count(ws) == 0  # nothing saved


def crossversion_folder_count(ws) -> int:
    return len([p for p in (ws.db / "_heads").glob("ensemble-*")]) if (ws.db / "_heads").exists() else 0


def test_a_version_without_labels_is_refused_by_name(views):
    ws = views
    unlabeled = [i for i, c in zip(ws.ids, ws.labels) if c < 0][:300]
    np.save(ws.root / "v4.npy", _view(ws.centres, ws.y, 4)[[ws.ids.index(i) for i in unlabeled]])
    pl.DataFrame({"id": unlabeled, "label": [None] * len(unlabeled)}).write_parquet(ws.root / "rows4.parquet")
    fourth = ws.import_embeddings(ws.root / "v4.npy", metadata=ws.root / "rows4.parquet").fingerprint
    with pytest.raises(ValueError, match=f"version {fourth[:12]} .* holds labeled images of 0 class"):
        ws.train_heads(versions=[ws.fps[0], fourth], heads="probe", folds=2)


def test_versions_option_errors(views):
    ws = views
    with pytest.raises(OptionError, match="either --version") as e:
        ws.train_heads(version=ws.fps[0], versions=ws.fps)
    assert e.value.option == "--versions"
    with pytest.raises(OptionError, match="more than once"):
        ws.train_heads(versions=[ws.fps[0], ws.fps[0][:8]])
    with pytest.raises(OptionError, match="matches none"):
        ws.train_heads(versions=[ws.fps[0], "ffffffff"])
    with pytest.raises(OptionError, match="a dict of version"):
        ws.train_heads(versions=ws.fps, heads="zero-shot,probe", text_embeddings=np.zeros((CLASSES, DIM)))
    with pytest.raises(FileNotFoundError, match="no ensemble trained over versions"):
        ws.predict(versions=ws.fps)
    with pytest.raises(LookupError, match="no predictions of the ensemble over versions"):
        ws.export(ws.root / "none.csv", versions=ws.fps)
    # one name is just --version
    single = ws.train_heads(versions=ws.fps[0][:8], heads="probe", folds=2)
    assert single.versions == [] and single.version == ws.fps[0]


def test_text_embeddings_per_version_give_each_version_its_zero_shot_head(views):
    ws = views
    rng = np.random.default_rng(5)
    texts = {}
    for k, fp in enumerate(ws.fps):
        T = ws.centres + 0.5 * rng.standard_normal(ws.centres.shape)
        texts[fp[:8]] = (T / np.linalg.norm(T, axis=1, keepdims=True)).astype(np.float32)
    steps = []
    trained = ws.train_heads(versions=ws.fps, heads="zero-shot,probe", folds=2, text_embeddings=texts,
                             progress=lambda stage, done, total: steps.append((stage, done, total)))
    total = 4 * (2 + 1 + 1)  # 2 heads x 2 versions, each: 2 folds, the train split, the refit
    assert steps[-1] == ("heads fitted", total, total) and len(steps) == total + 1
    assert [d for _, d, _ in steps] == sorted(d for _, d, _ in steps) and steps[-2][1] == total - 1
    zs = [f"{fp[:12]}/zero-shot" for fp in ws.fps]
    assert all(h in trained.heads for h in zs) and trained.unavailable == {}
    assert trained.scores[zs[0]]["accuracy"] > 0.5
    # without text embeddings an imported version has no text tower: skipped with its own reason
    bare = ws.train_heads(versions=ws.fps, heads="zero-shot,probe", folds=2)
    assert set(bare.unavailable) == set(zs) and all("imported without a model" in v for v in bare.unavailable.values())


def test_cli_train_predict_evaluate_export_over_versions(views, tmp_path):
    ws = views
    runner = CliRunner(env={"COLUMNS": "200"})  # wide enough for the tables, so that names are not wrapped
    versions = ",".join(fp[:8] for fp in ws.fps)
    db = str(ws.db)
    r = runner.invoke(app, ["train-heads", "--db", db, "--versions", versions, "--heads", HEADS, "--folds", "2"])
    assert r.exit_code == 0, r.output
    assert "its heads fused alone" in r.output and r.output.count(ws.fps[0][:12]) >= 3 and "fused" in r.output
    r = runner.invoke(app, ["predict", "--db", db, "--versions", versions])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "--db", db, "--versions", versions, "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    assert "most-confused class pairs" in r.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "confusions.csv")))
    assert rows and set(rows[0]) == {"class_a", "class_b", "a_as_b", "b_as_a", "errors", "rate", "similarity",
                                     "examples"}
    assert all(r_["examples"].startswith("id:img") for r_ in rows)  # imported rows: no file, their id
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["versions"] == ws.fps and set(metrics["version_scores"]) == {fp[:12] for fp in ws.fps}
    r = runner.invoke(app, ["export", str(tmp_path / "out.csv"), "--db", db, "--versions", versions])
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(open(tmp_path / "out.csv")))) == sum(1 for c in ws.labels if c < 0)
    r = runner.invoke(app, ["info", "--db", db])
    assert r.exit_code == 0 and f"ensemble over versions {ws.fps[0][:12]},{ws.fps[1][:12]} (6 heads" in r.output
    info = json.loads(runner.invoke(app, ["info", "--db", db, "--json"]).output)
    assert info["ensembles"][0]["fingerprints"] == ws.fps
    r = runner.invoke(app, ["predict", "--db", db, "--versions", versions, "--version", ws.fps[0]])
    assert r.exit_code == 2 and "either --version" in r.output
    r = runner.invoke(app, ["remove-version", ws.fps[1][:8], "--db", db], input="n\n")
    assert r.exit_code == 1 and len(ws.versions()) == 2  # declined: nothing removed
    r = runner.invoke(app, ["remove-version", ws.fps[1][:8], "--db", db, "--yes"])
    assert r.exit_code == 0 and "removed version" in r.output and len(ws.versions()) == 1
    r = runner.invoke(app, ["predict", "--db", db, "--versions", versions])
    assert r.exit_code == 2 and ws.fps[1][:8] in r.output


# ---- several word lists --------------------------------------------------------------------------
def test_two_word_lists_give_two_zero_shot_heads(tmp_path, tiny_model):
    from conftest import write_shapes_folder

    write_shapes_folder(tmp_path / "labeled", n_per_class=8, seed=0)
    write_shapes_folder(tmp_path / "unlabeled", n_per_class=4, seed=1)
    ws = clipfuse.open(tmp_path / "store.lance")
    ws.index(tmp_path / "labeled", unlabeled=tmp_path / "unlabeled", model=tiny_model, batch_size=8)
    classes = ws.store.classes()
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump({c: [c] for c in classes}))
    looks = tmp_path / "looks.yaml"
    looks.write_text(yaml.safe_dump({c: [f"a picture of a {c} shape", f"a drawn {c}"] for c in classes}))
    trained = ws.train_heads(heads="zero-shot,probe", folds=2, class_words=[names, looks])
    assert trained.heads[:2] == ["zero-shot:names", "zero-shot:looks"] and trained.unavailable == {}
    assert set(trained.weights) == {"zero-shot:names", "zero-shot:looks", "probe"}
    folder = trained.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["class_words"] == [str(names), str(looks)]
    from clipfuse.workspace import load_trained

    reloaded = load_trained(ws.store, ws.version(), notify=lambda n: None)
    zs = reloaded.ensemble.heads
    assert not np.allclose(zs["zero-shot:names"].class_embeddings, zs["zero-shot:looks"].class_embeddings)
    ws.predict(per_head=True)
    columns = ws.store.predictions().column_names
    assert {"probs_zero_shot_names", "probs_zero_shot_looks"} <= set(columns)
    # --heads of predict takes the kind: both zero-shot heads
    picked = ws.predict(heads="zero-shot")
    assert picked.heads == ["zero-shot:names", "zero-shot:looks"]
    # one list keeps the plain name; two files with one stem are refused
    assert ws.train_heads(heads="zero-shot", folds=2, class_words=names).heads == ["zero-shot"]
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / "names.yaml"
    twin.write_text(names.read_text())
    with pytest.raises(OptionError, match="two class-words files are named 'names'"):
        ws.train_heads(heads="zero-shot", class_words=[names, twin])
    runner = CliRunner(env={"COLUMNS": "200"})
    r = runner.invoke(app, ["train-heads", "--db", str(ws.db), "--heads", "zero-shot,probe", "--folds", "2",
                            "--class-words", str(names), "--class-words", str(looks)])
    assert r.exit_code == 0, r.output
    assert "zero-shot:names" in r.output and "zero-shot:looks" in r.output
    r = runner.invoke(app, ["evaluate", "--db", str(ws.db), "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "eval" / "confusions.csv")))
    for row in rows:  # example paths are the validation images' files
        assert row["class_a"] in classes and row["class_b"] in classes
        assert all((tmp_path / "labeled").as_posix() in p for p in row["examples"].split(" | "))


# ---- the ensemble itself (numpy only) ------------------------------------------------------------
def test_ensemble_views_fuse_rows_a_view_lacks_from_the_others():
    rng = np.random.default_rng(0)
    n, C = 900, 6
    centres = rng.standard_normal((C, 16))
    y = rng.integers(0, C, n)
    Xa, Xb = _view(centres, y, 1), _view(centres, y, 2)
    labels = np.full(n, -1)
    for c in range(C):
        labels[np.flatnonzero(y == c)[:8]] = c
    late = np.flatnonzero(labels < 0)[-100:]
    has_b = np.setdiff1d(np.arange(n), late)
    config = HeadsConfig(heads=("probe", "knn"), n_folds=2)
    ens = create_ensemble_from_config(config, C, views={"a": {}, "b": {}})
    ens.fit({"a": ViewRows(Xa, np.arange(n)), "b": ViewRows(Xb[has_b], has_b)}, labels)
    assert ens.head_names_ == ["a/probe", "a/knn", "b/probe", "b/knn"] and set(ens.view_scores_) == {"a", "b"}
    fused, per_head = ens.predict_proba({"a": ViewRows(Xa, np.arange(n), np.arange(n)),
                                         "b": ViewRows(Xb[has_b], has_b, np.arange(len(has_b)))}, n_rows=n)
    assert np.isnan(per_head["b/probe"][late]).all()
    a_only, _ = ens.predict_proba({"a": ViewRows(Xa, np.arange(n), np.arange(n)),
                                   "b": ViewRows(Xb[has_b], has_b, np.arange(len(has_b)))}, n_rows=n,
                                  heads=["a/probe", "a/knn"])
    np.testing.assert_allclose(fused[late], a_only[late], atol=1e-5)  # the late rows: a's heads only
    assert not np.allclose(fused[has_b], a_only[has_b], atol=1e-3)  # the others: both views
    with pytest.raises(ValueError, match="no rows given for view"):
        ens.predict_proba({"a": ViewRows(Xa, np.arange(n))}, n_rows=n)
    with pytest.raises(ValueError, match="distinct indices"):
        ens.fit({"a": ViewRows(Xa, np.zeros(n, dtype=int)), "b": ViewRows(Xb, np.arange(n))}, labels)


# ---- the README's recipe, run as written ---------------------------------------------------------
def test_readme_two_version_recipe_runs_as_written(tmp_path, tiny_model):
    """The README's two-finetunes recipe, with the tiny model for ViT-B-16 and one epoch for ten."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_shapes_folder

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- recipe: two-versions -->\n```bash\n(.*?)```", readme, re.S).group(1)
    assert "--model ViT-B-16 --pretrained openai" in block and "--epochs 10" in block
    script = block.replace("--model ViT-B-16 --pretrained openai", f"--model {tiny_model} --batch-size 8") \
        .replace("--epochs 10", "--epochs 1 --batch-size 8")
    write_shapes_folder(tmp_path / "data" / "train", n_per_class=8, seed=0)
    write_shapes_folder(tmp_path / "data" / "pool", n_per_class=3, seed=1)
    for path in [p for files in write_shapes_folder(tmp_path / "shapes-test", n_per_class=2, seed=2).values()
                 for p in files]:  # a flat test folder of unique names, as a competition gives it
        (tmp_path / "data" / "test").mkdir(exist_ok=True)
        path.rename(tmp_path / "data" / "test" / f"{path.parent.name}_{path.name}")
    classes = sorted(p.name for p in (tmp_path / "data" / "train").iterdir())
    (tmp_path / "words_a.yaml").write_text(yaml.safe_dump({c: [c] for c in classes}))
    (tmp_path / "words_b.yaml").write_text(yaml.safe_dump({c: [f"a {c} drawn in one colour"] for c in classes}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ws = clipfuse.open(tmp_path / "clipfuse.lance")
    versions = ws.versions()
    assert len(versions) == 3 and sum(v.model.startswith("local-dir:") for v in versions) == 3
    assert "zero-shot:words_a" in done.stdout and "zero-shot:words_b" in done.stdout and "finetuned" in done.stdout
    rows = list(csv.DictReader(open(tmp_path / "submission.csv")))
    assert len(rows) == 2 * len(classes) and set(rows[0]) == {"id", "label"}
    assert (tmp_path / "eval" / "confusions.csv").exists() and (tmp_path / "eval" / "metrics.json").exists()
