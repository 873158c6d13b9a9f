"""Finetuning, WiSE-FT and re-embedding on the tiny model and generated shape images."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipfuse.cli import app
from clipfuse.store import Store
from clipfuse.train import head_logits, interpolate, interpolate_head, parse_alphas, read_model_folder, sweep

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model):
    """A store of coloured shapes (12 labeled per class, 6 unlabeled) and a model finetuned on it."""
    from conftest import write_shapes_folder

    root = tmp_path_factory.mktemp("ft")
    write_shapes_folder(root / "labeled", n_per_class=12, seed=0)
    write_shapes_folder(root / "unlabeled", n_per_class=6, seed=1)
    db = root / "store.lance"
    assert invoke("index", root / "labeled", "--unlabeled", root / "unlabeled", "--db", db,
                  "--model", tiny_model).exit_code == 0
    result = invoke("finetune", "--db", db, "--out", root / "ft", "--epochs", 15, "--lr", 3e-3,
                    "--batch-size", 8, "--patience", 15)
    assert result.exit_code == 0, result.output
    return root, db, result.output


def test_finetune_lowers_loss_and_beats_zero_shot(finetuned):
    root, db, output = finetuned
    meta, heads = read_model_folder(root / "ft")
    history = meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(h["val_accuracy"] for h in history)
    assert best > meta["start_accuracy"]
    assert meta["best_epoch"] >= 1 and heads["finetuned"]["weight"].shape == heads["start"]["weight"].shape == (3, 16)
    assert "bias" not in heads["finetuned"] and "bias" not in heads["start"]  # cosine classifiers
    assert meta["config"]["epochs"] == 15 and meta["train_images"] == 30
    assert "validation accuracy" in output
    preprocess = json.loads((root / "ft" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert preprocess["size"] == [32, 32] and preprocess["interpolation"] == "bicubic"
    assert preprocess["resize_mode"] == "shortest" and len(preprocess["mean"]) == 3


def test_interpolation_ends_are_exact_and_the_sweep_takes_the_argmax():
    torch.manual_seed(0)
    a = {"w": torch.randn(4, 3), "b": torch.randn(3), "n": torch.tensor(7)}
    b = {"w": torch.randn(4, 3), "b": torch.randn(3), "n": torch.tensor(9)}
    for k in a:
        assert torch.equal(interpolate(a, b, 0.0)[k], a[k]) or k == "n"
        assert torch.equal(interpolate(a, b, 1.0)[k], b[k])
    with pytest.raises(ValueError, match="different parameters"):
        interpolate(a, {"w": a["w"]}, 0.5)

    model = torch.nn.Linear(3, 2)
    zs, ft = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, \
        {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    labels = torch.tensor([0, 1, 1])
    accuracy_at = {0.0: 0, 0.5: 3, 1.0: 2}  # correct answers per alpha: the peak is in the middle

    def features(alpha, m):
        out = torch.tensor([[1.0, 0.0]] * 3)
        out[:accuracy_at[alpha], :] = torch.eye(2)[labels[:accuracy_at[alpha]]]
        return out

    eye = {"weight": torch.eye(2)}
    result = sweep(model, zs, ft, eye, eye, [0.0, 0.5, 1.0], features, labels)
    assert result["best_alpha"] == 0.5 and result["accuracies"][1] == 1.0
    assert torch.all(model.weight == 0.5)  # the best alpha is left loaded

    # a linear classifier (image-only backbones): weights and bias are interpolated, rows are not normalised
    start = {"weight": torch.eye(2) * 2, "bias": torch.tensor([1.0, 0.0])}
    end = {"weight": torch.eye(2) * 4, "bias": torch.tensor([0.0, 3.0])}
    mid = interpolate_head(start, end, 0.5)
    assert torch.equal(mid["weight"], torch.eye(2) * 3) and torch.equal(mid["bias"], torch.tensor([0.5, 1.5]))
    # the bias decides: features [1, 0] score 3 + 0.5 for class 0 and 0 + 1.5 for class 1
    assert torch.equal(head_logits(torch.tensor([[1.0, 0.0]]), mid), torch.tensor([[3.5, 1.5]]))
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="start:stop:step"):
        parse_alphas("0:1")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        parse_alphas("0,2")


def test_wise_ft_endpoints_reproduce_both_models(finetuned, tiny_model):
    root, db, _ = finetuned
    result = invoke("wise-ft", "--checkpoint", root / "ft", "--db", db, "--alphas", "0:1:0.5", "--out", root / "w")
    assert result.exit_code == 0, result.output
    meta, heads = read_model_folder(root / "w")
    curve = meta["alpha_curve"]
    assert list(curve) == ["0.0", "0.5", "1.0"] and meta["alpha"] == float(max(curve, key=curve.get))
    assert (root / "w" / "alpha_curve.png").read_bytes()[:4] == b"\x89PNG"
    from clipfuse.train import load_state

    tiny_state = load_state(tiny_model[len("local-dir:"):])
    ft_state = load_state(root / "ft")
    w_state = load_state(root / "w")
    alpha = meta["alpha"]
    expected = interpolate(tiny_state, ft_state, alpha)
    for k in expected:
        assert torch.equal(w_state[k], expected[k])
    # the alpha-0 accuracy equals the finetune run's zero-shot accuracy (store vectors, base model)
    assert curve["0.0"] == pytest.approx(read_model_folder(root / "ft")[0]["start_accuracy"])


def test_reembed_adds_a_version_with_the_same_ids_and_resumes_after_a_crash(finetuned):
    root, db, _ = finetuned
    store = Store(db)
    old = store.get_version()
    old_ids = set(store.load_embeddings(old.fingerprint).ids)

    # a crash midway: kill the process right after its first commit (8 images)
    code = (
        "import os, sys; import clipfuse.store.indexer as ix; real = ix._Writer.submit\n"
        "def submit(self, pending):\n"
        "    real(self, pending); self.close(); os._exit(9) if len(pending) else None\n"
        "ix._Writer.submit = submit\n"
        "from clipfuse.cli import app; sys.argv = ['clipfuse', 'reembed', '--model-checkpoint', sys.argv[1],"
        " '--db', sys.argv[2], '--batch-size', '4', '--commit-every', '8']; app()\n"
    )
    crashed = subprocess.run([sys.executable, "-c", code, str(root / "ft"), str(db)], capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr
    store = Store(db)
    assert store.get_version().fingerprint == old.fingerprint  # old version still active
    partial = [v for v in store.versions() if v.fingerprint != old.fingerprint]
    assert len(partial) == 1 and 0 < partial[0].rows < len(old_ids)

    result = invoke("reembed", "--model-checkpoint", root / "ft", "--db", db, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    store = Store(db)
    new = store.get_version()
    assert new.fingerprint == partial[0].fingerprint != old.fingerprint
    es = store.load_embeddings(new.fingerprint)
    assert set(es.ids) == old_ids and len(es.ids) == len(set(es.ids)) == new.rows
    assert len(store.load_embeddings(old.fingerprint).ids) == len(old_ids)  # old version still readable
    assert not np.allclose(es.X[np.argsort(es.ids)], store.load_embeddings(old.fingerprint).X[
        np.argsort(store.load_embeddings(old.fingerprint).ids)])

    heads = invoke("train-heads", "--db", db, "--folds", 2)
    assert heads.exit_code == 0, heads.output
    assert "finetuned" in heads.output and "finetuned skipped" not in heads.output
    # the folder now backs a version: finetuning into it again is refused
    result = invoke("finetune", "--db", db, "--version", old.fingerprint, "--out", root / "ft", "--epochs", 1)
    assert result.exit_code == 1 and "holds the model of embedding version" in result.output


def test_model_folders_written_before_image_only_backbones_still_read(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    save_file({"finetuned": torch.ones(2, 4), "zero_shot": torch.zeros(2, 4)}, str(tmp_path / "classifier.safetensors"))
    (tmp_path / "clipfuse.json").write_text(json.dumps({"kind": "finetuned", "zero_shot_accuracy": 0.5}))
    meta, heads = read_model_folder(tmp_path)
    assert set(heads) == {"finetuned", "start"} and torch.equal(heads["start"]["weight"], torch.zeros(2, 4))
    assert meta["start_accuracy"] == 0.5 and meta["start"] == "zero-shot"


def test_finetune_refuses_a_run_that_would_train_nothing():
    from clipfuse.train import FinetuneConfig

    with pytest.raises(ValueError, match="nothing would train"):
        FinetuneConfig(train_text=True, freeze_backbone=True)


def test_finetune_explains_bad_inputs(tmp_path):
    result = invoke("wise-ft", "--checkpoint", tmp_path, "--db", tmp_path / "db")
    assert result.exit_code == 1 and "not a clipfuse model folder" in result.output
    result = invoke("wise-ft", "--checkpoint", tmp_path, "--alphas", "1:0")
    text = " ".join(result.output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
    assert result.exit_code == 2 and "--alphas" in text and "got '1:0'" in text  # a command-line mistake


def test_demo_with_finetune_runs_end_to_end(tmp_path, tiny_model):
    result = invoke("demo", "--workdir", tmp_path / "demo", "--model", tiny_model, "--finetune", "--unlabeled", 60)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"finetuned: validation accuracy [01]\.\d{3} \(zero-shot\) -> [01]\.\d{3}; WiSE-FT best "
                     r"alpha [01](\.\d+)? \([01]\.\d{3}\)", text), text
    assert "re-embedded 210 images (0 already done)" in text
    assert text.count("accuracy on the 60 unlabeled demo images") == 2  # before and after finetuning
    active = Store(tmp_path / "demo" / "clipfuse.lance").get_version()
    assert active.model_name.folder == (tmp_path / "demo" / "models" / "ft-wiseft").resolve()


def test_finetune_options_text_tower_mean_teacher_augment_pseudo_labels(finetuned):
    root, db, _ = finetuned
    result = invoke("finetune", "--db", db, "--out", root / "ft2", "--epochs", 2, "--lr", 1e-3, "--batch-size", 8,
                    "--pseudo-labels", 4)
    assert result.exit_code == 1 and "run `clipfuse train-heads` and `clipfuse predict` first" in result.output
    assert invoke("train-heads", "--db", db, "--heads", "probe,propagation", "--folds", 2).exit_code == 0
    assert invoke("predict", "--db", db).exit_code == 0
    result = invoke("finetune", "--db", db, "--out", root / "ft2", "--epochs", 2, "--lr", 1e-3, "--batch-size", 8,
                    "--train-text", "--mean-teacher", "--augment", "--pseudo-labels", 4,
                    "--pseudo-min-confidence", 0.0)
    assert result.exit_code == 0, result.output
    meta, _ = read_model_folder(root / "ft2")
    assert meta["config"]["train_text"] and meta["config"]["mean_teacher"] and meta["config"]["augment"]
    assert 30 < meta["train_images"] <= 30 + 12  # at most 4 pseudo-labels for each of the 3 classes
    assert len(meta["history"]) >= 1 and np.isfinite(meta["history"][0]["train_loss"])


@pytest.fixture(scope="module")
def timm_finetuned(tmp_path_factory, tiny_timm):
    """Digits embedded by timm's tiny test_efficientnet (random weights from a file), then finetuned."""
    from clipfuse.data import write_digits_dataset

    name, weights = tiny_timm
    root = tmp_path_factory.mktemp("ft-timm")
    paths = write_digits_dataset(root, max_unlabeled=30)
    db = root / "store.lance"
    assert invoke("index", paths["labeled"], "--unlabeled", paths["unlabeled"], "--db", db, "--model", name,
                  "--pretrained", weights).exit_code == 0
    result = invoke("finetune", "--db", db, "--out", root / "ft", "--epochs", 8, "--lr", 3e-3, "--batch-size", 8,
                    "--patience", 8)
    assert result.exit_code == 0, result.output
    return root, db, weights


def test_image_only_finetune_starts_from_the_linear_probe_and_keeps_the_best_epoch(timm_finetuned):
    from safetensors.torch import load_file

    from clipfuse.data import split_labeled

    root, db, _ = timm_finetuned
    meta, heads = read_model_folder(root / "ft")
    assert meta["start"] == "linear probe" and meta["base_model"] == "timm:test_efficientnet"
    assert heads["finetuned"]["weight"].shape == heads["start"]["weight"].shape == (10, 256)
    assert heads["finetuned"]["bias"].shape == heads["start"]["bias"].shape == (10,)
    assert sorted(load_file(str(root / "ft" / "classifier.safetensors"))) == [
        "finetuned", "finetuned_bias", "start", "start_bias"]  # the flat layout on disk
    # the start is the frozen backbone + FC: on the store's vectors (the base model's features) it scores
    # exactly the validation accuracy finetuning started from
    es = Store(db).load_embeddings()
    _, val_idx = split_labeled(es.labels, val_fraction=0.2, seed=0)
    logits = head_logits(torch.from_numpy(es.X[val_idx]), heads["start"])
    assert float((logits.argmax(1).numpy() == es.labels[val_idx]).mean()) == pytest.approx(meta["start_accuracy"])
    # backbone and layer train together; the kept epoch is the best on validation, or the start (epoch 0)
    # when no epoch beat it: with random backbone weights, which of the two happens depends on the CPU's
    # rounding (it went both ways on AVX2 and AVX-512 machines), so the test checks the choice, not the luck
    history = meta["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 4
    accuracies = [h["val_accuracy"] for h in history]
    expected = 0 if max(accuracies) <= meta["start_accuracy"] else 1 + int(np.argmax(accuracies))
    assert meta["best_epoch"] == expected
    # a timm folder: timm's config.json + model.safetensors, loadable as timm:local-dir:
    assert json.loads((root / "ft" / "config.json").read_text())["architecture"] == "test_efficientnet"


def test_image_only_wise_ft_reembed_and_finetuned_head(timm_finetuned):
    root, db, _ = timm_finetuned
    meta = read_model_folder(root / "ft")[0]
    result = invoke("wise-ft", "--checkpoint", root / "ft", "--db", db, "--alphas", "0,1", "--out", root / "wise")
    assert result.exit_code == 0, result.output
    wise = read_model_folder(root / "wise")[0]
    assert wise["alpha_curve"]["0.0"] == pytest.approx(meta["start_accuracy"])
    assert wise["alpha_curve"]["1.0"] == pytest.approx(max(h["val_accuracy"] for h in meta["history"]))
    assert "linear probe" in " ".join(result.output.split())

    result = invoke("reembed", "--model-checkpoint", root / "wise", "--db", db)
    assert result.exit_code == 0, result.output
    active = Store(db).get_version()
    assert active.model == f"timm:local-dir:{(root / 'wise').resolve()}" and active.dim == 256
    result = invoke("train-heads", "--db", db, "--heads", "zero-shot,finetuned,probe", "--folds", 2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "zero-shot skipped" in text and "finetuned skipped" not in text
    assert "finetuned" in text.split("zero-shot skipped")[0]  # scored in the table
    result = invoke("predict", "--db", db, "--per-head")  # the saved linear layer (with its bias) loads back
    assert result.exit_code == 0, result.output
    assert "probs_finetuned" in Store(db).predictions(active.fingerprint).column_names


def test_image_only_frozen_backbone_trains_only_the_layer(tmp_path, timm_finetuned, tiny_timm):
    from conftest import write_shapes_folder

    from clipfuse.embed import EmbedderConfig, create_embedder
    from clipfuse.train import FinetuneConfig, finetune

    name, weights = tiny_timm
    embedder = create_embedder(EmbedderConfig(model=name, pretrained=str(weights)))
    before = {k: v.clone() for k, v in embedder.model.state_dict().items()}
    files = write_shapes_folder(tmp_path, n_per_class=4)
    train = [(str(p), c) for c, paths in enumerate(files.values()) for p in paths]
    # no validation images: every epoch is kept, so the result is the trained layer, not the start
    result = finetune(embedder, train, [], None, FinetuneConfig(epochs=2, lr=1e-2, batch_size=4, augment=True,
                                                                freeze_backbone=True))
    after = embedder.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert result.best_epoch == 2 and not torch.equal(result.head["weight"], result.start["weight"])
    assert not torch.equal(result.head["bias"], result.start["bias"])

    root, db, _ = timm_finetuned
    base = Store(db).versions()[0].fingerprint
    result = invoke("finetune", "--db", db, "--version", base, "--out", root / "text", "--train-text")
    assert result.exit_code == 2 and "needs a CLIP model" in result.output
