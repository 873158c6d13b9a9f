"""Out-of-distribution scores: ood_scores, the predictions table's ood column, export's OOD abstention."""

from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import clipfuse
from clipfuse.classify import ood_scores
from clipfuse.classify import ood as ood_module
from clipfuse.classify.ood import knn_distance, percentile_ranks, reference_rows, top_k_mean
from clipfuse.cli import app
from clipfuse.workspace import OptionError

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from ood import make_imbalanced, pick_labels  # noqa: E402


def _auroc(positive, score) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def _pool(seed=0):
    """16 Zipf-sized classes in 64 dims plus 10 % distractors around 4 centres of their own; 15 labels per class."""
    from sklearn.linear_model import LogisticRegression

    X, y, ood = make_imbalanced(n_in=2000, dim=64, n_classes=16, n_ood_centres=4, noise=1.2, seed=seed)
    y_semi = pick_labels(y, ood, 15, seed)
    P = LogisticRegression(C=10.0, max_iter=3000).fit(X[y_semi >= 0], y_semi[y_semi >= 0]).predict_proba(X)
    return X, P, y_semi, ood


# ---- ood_scores ---------------------------------------------------------------------------------
def test_ood_scores_separate_planted_distractors_better_than_confidence_alone():
    X, P, y_semi, ood = _pool(seed=0)
    s = ood_scores(X, P, y_semi)
    assert s.shape == (len(X),) and s.dtype == np.float32 and s.min() >= 0.0 and s.max() <= 1.0
    unl = y_semi < 0
    auroc, msp = _auroc(ood[unl], s[unl]), _auroc(ood[unl], 1.0 - P.max(axis=1)[unl])
    assert auroc >= 0.90 and auroc >= msp + 0.04, (auroc, msp)  # measured 0.954 against 0.874
    # a percentile: the highest score is 1, and the share above 0.9 is about a tenth of the pool
    assert s.max() == pytest.approx(1.0) and 0.08 <= np.mean(s > 0.9) <= 0.11


def test_the_knn_part_finds_distractors_the_classifier_is_sure_of():
    X, P, y_semi, ood = _pool(seed=1)
    sure = np.eye(P.shape[1], dtype=np.float32)[P.argmax(axis=1)]  # every row 100 % confident: 1 - max P says nothing
    s = ood_scores(X, sure, y_semi, confident=0.0)  # the labeled rows' neighbourhoods alone
    unl = y_semi < 0
    assert _auroc(ood[unl], s[unl]) >= 0.75  # measured 0.85


def test_knn_distance_in_blocks_matches_a_direct_computation(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ref = np.sort(rng.choice(300, 120, replace=False))
    S = X @ X[ref].T
    S[ref, np.arange(len(ref))] = -np.inf  # a reference row is not its own neighbour
    expected = 1.0 - np.sort(S, axis=1)[:, -7:].mean(axis=1)
    monkeypatch.setattr(ood_module, "_BLOCK_ELEMENTS", 1000)  # 8 rows per block: many blocks and a ragged last one
    got = knn_distance(X, ref, 7, n_components=None)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.all(got[ref] > 1e-3)  # the row itself (distance 0) was left out
    # in the reference's leading directions: close to the full vectors when they hold most of the energy
    low_rank = (rng.standard_normal((300, 4)) @ rng.standard_normal((4, 16))).astype(np.float32)
    low_rank /= np.linalg.norm(low_rank, axis=1, keepdims=True)
    np.testing.assert_allclose(knn_distance(low_rank, ref, 7, n_components=4),
                               knn_distance(low_rank, ref, 7, n_components=None), atol=1e-4)


@pytest.mark.parametrize("m", [40, 100, 1000, 4097])
def test_top_k_mean_equals_a_full_partition(m):
    rng = np.random.default_rng(m)
    S = rng.standard_normal((64, m)).astype(np.float32)
    S[:, :3] = -np.inf
    S[:8] = np.round(S[:8])  # many ties
    np.testing.assert_allclose(top_k_mean(S, 10), np.sort(S, axis=1)[:, -10:].mean(axis=1), rtol=1e-6)


def test_reference_rows_and_percentile_ranks():
    P = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.5, 0.5]], dtype=np.float32)
    y = np.array([-1, -1, -1, -1, -1, 1])
    # the labeled row, the more confident half (rounded up) of class 0's unlabeled rows and of class 1's
    assert reference_rows(P, y, confident=0.5, max_reference=10).tolist() == [0, 2, 3, 5]
    assert reference_rows(P, y, confident=0.0, max_reference=10).tolist() == [5]
    assert len(reference_rows(P, y, confident=1.0, max_reference=3)) == 3
    assert percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert percentile_ranks(np.array([5.0])).tolist() == [0.0]
    # a reference of one row: the output score alone; one image: 0
    assert ood_scores(np.eye(3, 4, dtype=np.float32), P[:3], [-1, -1, -1], confident=0.0).tolist() == [0.0, 1.0, 0.5]
    assert ood_scores(np.eye(1, 4), P[:1], [-1]).tolist() == [0.0]


@pytest.mark.parametrize("change, match", [
    (dict(P=np.full((9, 3), 1 / 3)), "X has 10 rows, P 9"),
    (dict(y=np.full(9, -1)), r"y shape \(9,\)"),
    (dict(X=np.full((10, 4), np.nan)), "X holds NaN or infinite values .first in row 0"),
    (dict(P=np.where(np.eye(10, 3) > 0, np.nan, 1 / 3)), "P holds NaN"),
    (dict(P=np.full((10, 3), 5.0)), "not logits"),
    (dict(X=np.ones(10)), "2-D array"),
    (dict(y=np.full(10, 3)), "class index below 3"),
    (dict(y=np.full(10, -2)), "values from -2"),
    (dict(y=np.full(10, 0.5)), "integer class indices"),
    (dict(n_neighbors=0), "n_neighbors must be an integer of at least 1; got 0"),
    (dict(n_neighbors=2.5), "n_neighbors"),
    (dict(confident=1.5), "confident must be a share between 0 and 1.*got 1.5"),
    (dict(confident=float("nan")), "confident"),
    (dict(max_reference=1), "max_reference must be an integer of at least 2"),
    (dict(n_components=0), "n_components must be a positive integer or None"),
])
def test_ood_scores_name_the_bad_argument(change, match):
    args = dict(X=np.eye(10, 4, dtype=np.float32), P=np.full((10, 3), 1 / 3), y=np.full(10, -1))
    args.update(change)
    X, P, y = args.pop("X"), args.pop("P"), args.pop("y")
    with pytest.raises(ValueError, match=match):
        ood_scores(X, P, y, **args)


def test_the_ood_column_over_several_versions_scores_the_first_versions_rows():
    from clipfuse.classify import ViewRows
    from clipfuse.workspace.heads import ood_column

    X, P, y_semi, _ = _pool(seed=2)
    n = len(X)
    held = np.arange(0, n, 2)  # the first version holds every other image; the second all of them
    trained = types.SimpleNamespace(
        es=types.SimpleNamespace(labels=np.where(y_semi >= 0, y_semi, -1), X=None),
        versions=[types.SimpleNamespace(short="aaaa"), types.SimpleNamespace(short="bbbb")],
        views={"aaaa": ViewRows(X[held], held, None), "bbbb": ViewRows(X, np.arange(n), None)})
    got = ood_column(trained, P.astype(np.float32))
    assert np.isnan(got[1::2]).all() and np.isfinite(got[held]).all()
    np.testing.assert_array_equal(got[held], ood_scores(X[held], P[held], y_semi[held]))
    # a label of a class added after training (no column of P) is treated as unlabeled, not refused
    trained.views, trained.es.X = None, X
    trained.es.labels = np.where(np.arange(n) == 3, P.shape[1], trained.es.labels)
    assert np.isfinite(ood_column(trained, P.astype(np.float32))).all()


# ---- predict and export -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A predicted store of imported vectors: 3 classes of 70 images plus 30 distractors, 20 labels per class."""
    root = tmp_path_factory.mktemp("ood")
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 16))
    source = np.repeat(np.arange(4), [70, 70, 70, 30])
    X = centres[source] + rng.standard_normal((len(source), 16))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    labeled = {i for c in range(3) for i in np.flatnonzero(source == c)[:20]}
    rows = [{"id": f"img{i:03d}", "label": f"c{source[i]}" if i in labeled else None} for i in range(len(X))]
    np.save(root / "v.npy", X)
    pl.DataFrame(rows).write_parquet(root / "rows.parquet")
    ws = clipfuse.open(root / "s.lance")
    ws.import_embeddings(root / "v.npy", metadata=root / "rows.parquet")
    ws.train_heads(heads="probe,knn", folds=2)
    ws.predict()
    ws.root, ws.distractors = root, {f"img{i:03d}" for i in np.flatnonzero(source == 3)}
    return ws


def _stored_ood(ws) -> dict:
    t = ws.store.predictions(ws.version().fingerprint).select(["id", "ood"]).to_pydict()
    return dict(zip(t["id"], t["ood"]))


def test_predict_stores_an_ood_column_that_finds_the_distractors(store):
    table = store.store.predictions(store.version().fingerprint)
    assert table.schema.field("ood").type == "float" and table["ood"].null_count == 0
    d = table.select(["id", "known_label", "ood"]).to_pydict()
    unlabeled = [k for k, known in enumerate(d["known_label"]) if known is None]
    assert len(unlabeled) == 180 and all(0.0 <= v <= 1.0 for v in d["ood"])
    assert _auroc([d["id"][k] in store.distractors for k in unlabeled], [d["ood"][k] for k in unlabeled]) > 0.9


def test_export_ood_threshold_abstains_exactly_where_the_stored_score_is_above_it(store, tmp_path):
    ood = _stored_ood(store)
    r = store.export(tmp_path / "a.csv", ood_threshold=0.8, split="all")
    df = pl.read_csv(tmp_path / "a.csv")
    assert df.columns == ["path", "id", "label", "confidence", "ood"]
    store.export(tmp_path / "b.csv", split="all")
    plain = pl.read_csv(tmp_path / "b.csv")
    assert df["id"].to_list() == plain["id"].to_list() and df.height == 240
    for row, before in zip(df.iter_rows(named=True), plain.iter_rows(named=True)):
        assert row["ood"] == pytest.approx(ood[row["id"]])
        assert row["label"] == ("unknown" if ood[row["id"]] > 0.8 else before["label"]), row
    above = sum(v > 0.8 for v in ood.values())
    assert r.abstained == r.abstained_ood == above > 0 and r.abstained_confidence == 0 and r.ood_threshold == 0.8


def test_export_ood_fraction_and_min_confidence_combine(store, tmp_path):
    r = store.export(tmp_path / "f.csv", ood_fraction=0.1, abstain_label="other")
    df = pl.read_csv(tmp_path / "f.csv")
    flagged = df.filter(pl.col("label") == "other")
    assert r.abstained_ood == flagged.height == math.floor(0.1 * df.height + 0.5) > 0
    assert flagged["ood"].min() >= df.filter(pl.col("label") != "other")["ood"].max()  # the highest scores
    assert r.ood_threshold == pytest.approx(flagged["ood"].min())
    cut = float(np.quantile(df["confidence"].to_numpy(), 0.3))  # about a third of the images below it
    both = store.export(tmp_path / "g.csv", ood_fraction=0.1, min_confidence=cut)
    df = pl.read_csv(tmp_path / "g.csv")
    low = set(df.filter(pl.col("confidence") < cut)["id"])
    assert both.abstained_confidence == len(low) > 0 and both.abstained_ood == r.abstained_ood
    unknown = set(df.filter(pl.col("label") == "unknown")["id"])
    assert unknown == low | set(flagged["id"]) and both.abstained == len(unknown) <= len(low) + r.abstained_ood
    runner = CliRunner(env={"COLUMNS": "400"})  # the summary on one line
    out = runner.invoke(app, ["export", str(tmp_path / "h.csv"), "--db", str(store.db), "--ood-fraction", "0.1",
                              "--min-confidence", str(cut)])
    assert out.exit_code == 0, out.output
    assert (f"; {both.abstained_confidence} below confidence {cut:.4f} and the {both.abstained_ood} most out of "
            f"distribution (ood from {both.ood_threshold:.4f}): {both.abstained} in all as 'unknown'") in out.output
    out = runner.invoke(app, ["export", str(tmp_path / "j.csv"), "--db", str(store.db), "--ood-threshold", "0.9"])
    assert out.exit_code == 0 and "with ood above 0.9000 as 'unknown'" in out.output, out.output
    assert store.export(tmp_path / "i.csv", ood_fraction=0.0).abstained == 0


@pytest.mark.parametrize("kwargs, option", [
    (dict(ood_threshold=-0.1), "--ood-threshold"), (dict(ood_threshold=1.5), "--ood-threshold"),
    (dict(ood_threshold=float("nan")), "--ood-threshold"), (dict(ood_fraction=-0.1), "--ood-fraction"),
    (dict(ood_fraction=1.01), "--ood-fraction"), (dict(ood_fraction=float("nan")), "--ood-fraction"),
    (dict(ood_threshold=0.9, ood_fraction=0.1), "--ood-fraction"),
])
def test_export_refuses_bad_ood_options_by_name(store, tmp_path, kwargs, option):
    with pytest.raises(OptionError) as e:
        store.export(tmp_path / "x.csv", **kwargs)
    assert e.value.option == option
    flags = [a for k, v in kwargs.items() for a in ("--" + k.replace("_", "-"), str(v))]
    out = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["export", str(tmp_path / "x.csv"), "--db", str(store.db),
                                                         *flags])
    assert out.exit_code == 2 and option in out.output, out.output
    assert not (tmp_path / "x.csv").exists()


def test_predictions_without_the_ood_column_still_export(store, tmp_path):
    db = tmp_path / "old.lance"
    shutil.copytree(store.db, db, symlinks=True)
    ws = clipfuse.open(db)
    fp = ws.version().fingerprint
    ws.store.write_predictions(ws.store.predictions(fp).drop_columns(["ood"]), fp)  # as clipfuse wrote it before
    r = ws.export(tmp_path / "old.csv", min_confidence=0.5)
    df = pl.read_csv(tmp_path / "old.csv")
    assert df.columns == ["path", "id", "label", "confidence", "ood"] and df["ood"].null_count() == df.height
    assert r.rows == df.height > 0
    for option in ("ood_threshold", "ood_fraction"):
        with pytest.raises(OptionError, match="no OOD scores.*run `clipfuse predict` again") as e:
            ws.export(tmp_path / "o.csv", **{option: 0.5})
        assert e.value.option == "--" + option.replace("_", "-")
    assert ws.gallery(sort="ood").total == 240  # no score: the review app still sorts by it (nulls last)


def test_the_gallery_sorts_by_ood_score_most_unusual_first(store):
    page = store.gallery(sort="ood", limit=20)
    ood = _stored_ood(store)
    scores = [ood[r.id] for r in page.rows]
    assert scores == sorted(scores, reverse=True) and scores[0] == max(ood.values())
