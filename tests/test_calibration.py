"""Calibrated confidence (temperature scaling out of fold) and abstention in export."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import clipfuse
from clipfuse.classify import Ensemble, create_ensemble
from clipfuse.classify.base import fit_temperature, softmax
from clipfuse.classify.metrics import expected_calibration_error, risk_coverage, threshold_for_precision
from clipfuse.cli import app


def test_temperature_scaling_fixes_an_overconfident_fusion():
    rng = np.random.default_rng(0)
    Z = rng.normal(0, 1.5, (4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(Z)])  # softmax(Z) is calibrated by construction
    over = softmax(4.0 * Z)  # the same ranking, four times too sharp
    fit, held = slice(0, 2000), slice(2000, None)
    ens = Ensemble({}, 5)
    ens.temperature_ = fit_temperature(np.log(over[fit]), y[fit])
    assert ens.temperature_ == pytest.approx(0.25, rel=0.15)
    calibrated = ens._calibrate(over[held])
    before, after = expected_calibration_error(over[held], y[held]), expected_calibration_error(calibrated, y[held])
    assert before > 0.15 and after < 0.04 and after < before / 4
    assert np.array_equal(calibrated.argmax(1), over[held].argmax(1))  # the predictions stay


def test_a_fitted_ensemble_is_calibrated_out_of_fold_and_keeps_it_when_saved(tmp_path):
    from clipfuse.classify import load_ensemble, save_ensemble

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 60)
    X = np.eye(3, 8)[y] * 2.0 + rng.normal(0, 1.0, (180, 8))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labels = np.full(180, -1)
    picked = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(3)])
    labels[picked] = y[picked]
    ens = create_ensemble(["probe", "knn"], 3).fit(X, labels)
    assert ens.temperature_ > 0 and ens.val_fused_raw_.shape == ens.val_proba_["fused"].shape
    assert np.allclose(ens._calibrate(ens.val_fused_raw_), ens.val_proba_["fused"], atol=1e-6)
    save_ensemble(ens, tmp_path / "e", extra={})
    again, _ = load_ensemble(tmp_path / "e", external={"X_fit_": X})
    assert again.temperature_ == pytest.approx(ens.temperature_)
    np.testing.assert_allclose(again.predict_proba(X)[0], ens.predict_proba(X)[0], atol=1e-6)


def test_the_threshold_for_a_precision_keeps_the_most_images_that_reach_it():
    P = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0, 1])  # right, right, wrong, right, wrong (most confident first)
    curve = risk_coverage(P, y)
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 1.0, 2 / 3, 0.75, 0.6])
    assert threshold_for_precision(P, y, 0.75) == pytest.approx((0.6, 0.8, 0.75))
    assert threshold_for_precision(P, y, 1.0) == pytest.approx((0.8, 0.4, 1.0))
    assert threshold_for_precision(np.array([[0.6, 0.4]]), np.array([1]), 0.5) is None


def _store(tmp_path):
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 80)
    X = np.eye(3, 16)[y] * 1.2 + rng.normal(0, 0.7, (240, 16))  # overlapping: some images are uncertain
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labeled = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(3)])
    rows = [{"id": f"img{i:03d}", "label": f"c{y[i]}" if i in set(labeled) else None} for i in range(240)]
    np.save(tmp_path / "v.npy", X.astype(np.float32))
    pl.DataFrame(rows).write_parquet(tmp_path / "rows.parquet")
    ws = clipfuse.open(tmp_path / "s.lance")
    ws.import_embeddings(tmp_path / "v.npy", metadata=tmp_path / "rows.parquet")
    ws.train_heads(heads="probe,knn,propagation", folds=3)
    ws.predict()
    return ws


def test_evaluate_reports_calibration_and_export_abstains(tmp_path):
    ws = _store(tmp_path)
    report = ws.evaluate(out=tmp_path / "eval")
    cal = report.calibration
    assert cal["temperature"] > 0 and 0 <= cal["ece_after"] < 0.5 and cal["ece_before"] is not None
    assert (tmp_path / "eval" / "risk_coverage.png").stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["calibration"]["ece_after"] == \
        pytest.approx(cal["ece_after"])

    r = ws.export(tmp_path / "a.csv", min_confidence=0.9)
    df = pl.read_csv(tmp_path / "a.csv")
    low = df.filter(pl.col("confidence") < 0.9)
    assert r.abstained == low.height > 0 and set(low["label"]) == {"unknown"}
    assert "unknown" not in set(df.filter(pl.col("confidence") >= 0.9)["label"])

    r = ws.export(tmp_path / "b.csv", target_precision=0.9, abstain_label="not sure")
    assert r.threshold is not None and r.threshold_precision >= 0.9 and 0 < r.threshold_coverage <= 1
    df = pl.read_csv(tmp_path / "b.csv")
    assert set(df.filter(pl.col("confidence") < r.threshold)["label"]) <= {"not sure"}
    runner = CliRunner(env={"COLUMNS": "200"})
    out = runner.invoke(app, ["export", str(tmp_path / "c.csv"), "--db", str(tmp_path / "s.lance"),
                              "--target-precision", "0.9"])
    assert out.exit_code == 0 and "threshold" in out.output and "for precision 0.9" in out.output, out.output
    for kwargs, option in ((dict(min_confidence=1.5), "--min-confidence"),
                           (dict(min_confidence=0.5, target_precision=0.9), "--target-precision"),
                           (dict(min_confidence=0.5, abstain_label="c1"), "--abstain-label")):
        with pytest.raises(clipfuse.workspace.OptionError) as e:
            ws.export(tmp_path / "d.csv", **kwargs)
        assert e.value.option == option


def test_abstention_edge_cases_and_stale_predictions(tmp_path):
    ws = _store(tmp_path)
    for kwargs, option in ((dict(min_confidence=float("nan")), "--min-confidence"),
                           (dict(target_precision=float("nan")), "--target-precision"),
                           (dict(abstain_label="maybe"), "--abstain-label"),  # without a threshold it does nothing
                           (dict(min_confidence=0.5, abstain_label=" c1 "), "--abstain-label")):
        with pytest.raises(clipfuse.workspace.OptionError) as e:
            ws.export(tmp_path / "d.csv", **kwargs)
        assert e.value.option == option
    assert threshold_for_precision(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 0]), 0.5) == (0.0, 1.0, 1.0)
    low = ws.export(tmp_path / "e.csv", target_precision=0.01)  # every validation image meets it: none abstain
    assert low.threshold == 0.0 and low.abstained == 0
    # heads trained again on more classes, predict not run: a threshold from them is refused, as is evaluate
    ids = [r.id for r in ws.gallery(label="none", limit=5).rows]
    for i, id_ in enumerate(ids):
        ws.label(id_, "c3" if i % 2 else "c4")
    ws.label(ws.gallery(label="c0", limit=1).rows[0].id, "c3")
    ws.train_heads(heads="probe,knn", folds=2)
    with pytest.raises(ValueError, match="run `clipfuse predict` again"):
        ws.export(tmp_path / "f.csv", target_precision=0.9)
    ws.evaluate(out=tmp_path / "eval2")  # no labeled test images: it reads no predictions, and runs


def test_suggest_and_suspects_keep_a_sheet_without_force(tmp_path):
    ws = _store(tmp_path)
    sheet = tmp_path / "next.csv"
    sheet.write_text("id,label\nimg001,c0\n")
    runner = CliRunner(env={"COLUMNS": "200"})
    for command in ("suggest", "suspects"):
        out = runner.invoke(app, [command, "--db", str(tmp_path / "s.lance"), "--csv", str(sheet)])
        assert out.exit_code != 0 and "--force" in out.output and sheet.read_text() == "id,label\nimg001,c0\n"
    out = runner.invoke(app, ["suggest", "--db", str(tmp_path / "s.lance"), "--csv", str(sheet), "--force", "-n", "3"])
    assert out.exit_code == 0 and sheet.read_text().startswith("id,path,predicted")
    with pytest.raises(clipfuse.workspace.OptionError):
        ws.suggest(n=3, duplicate_threshold=-1.0)
    reasons = {s.reason.split(" (")[0].split(";")[0] for s in ws.suspects(n=200).suspects}
    assert "low confidence in the given label" not in reasons
