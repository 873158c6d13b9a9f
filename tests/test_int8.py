"""int8 on the CPU and reduced-size JPEG decoding: close to fp32 / full decoding, versions of their own."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import clipfuse
from clipfuse.embed import EmbedderConfig, ModelInfo, check_device, create_embedder, decode_image, read_image
from clipfuse.embed.int8 import SelfAttention, quantize_int8
from clipfuse.store import Store
from clipfuse.workspace import OptionError
from conftest import write_shapes_folder


def _noise(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def fp32(tiny_model):
    return create_embedder(EmbedderConfig(model=tiny_model, device="cpu"))


@pytest.fixture(scope="module")
def int8(tiny_model):
    return create_embedder(EmbedderConfig(model=tiny_model, device="cpu", precision="int8"))


# ---- the int8 model ---------------------------------------------------------------------------------
def test_int8_embeddings_are_close_to_fp32_but_computed_in_int8(fp32, int8):
    images = [_noise(i) for i in range(12)]
    X, Q = fp32.encode_images(images), int8.encode_images(images)
    cos = (X * Q).sum(1)
    assert cos.min() > 0.995, cos
    assert not np.allclose(X, Q, atol=1e-6)  # really another computation, not the fp32 model again
    np.testing.assert_allclose(np.linalg.norm(Q, axis=1), 1.0, atol=1e-5)
    texts = ["a red circle", "a blue square", "a green triangle", "a photo"]
    T, U = fp32.encode_texts(texts), int8.encode_texts(texts)  # the text tower runs in int8 too
    assert (T * U).sum(1).min() > 0.99
    kinds = {type(m) for m in int8.model.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds  # attention projections included
    assert torch.nn.MultiheadAttention not in kinds and torch.nn.Linear not in kinds


def test_fingerprint_differs_by_precision_and_decoding_and_old_ones_are_unchanged(fp32, int8, tiny_model):
    assert int8.fingerprint != fp32.fingerprint
    assert int8.info.weights_hash == fp32.info.weights_hash  # the same weights, quantized
    assert (fp32.info.precision, int8.info.precision) == ("fp32", "int8")
    draft = create_embedder(EmbedderConfig(model=tiny_model, device="cpu", decode="draft"))
    assert len({fp32.fingerprint, int8.fingerprint, draft.fingerprint}) == 3
    info = fp32.info  # fp32 / full decoding keep the fingerprint every store made before has
    old = hashlib.sha256(json.dumps([info.model, info.weights_hash, info.preprocess]).encode()).hexdigest()[:16]
    assert info.fingerprint == old
    assert ModelInfo(info.model, None, info.weights_hash, info.preprocess, info.dim, precision="int8").fingerprint \
        == int8.fingerprint


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_computes_what_multihead_attention_does(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ours = SelfAttention(mha).eval()
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    causal = torch.full((7, 7), float("-inf")).triu(1)  # open_clip's text mask: additive
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": causal.isinf()}, {"key_padding_mask": padding},
                   {"attn_mask": causal.isinf(), "key_padding_mask": padding}):
        want = mha(x, x, x, need_weights=False, **kwargs)[0]
        got = ours(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    y = torch.randn(*x.shape)  # cross attention: each input through its own third of the projection
    torch.testing.assert_close(ours(x, y, y)[0], mha(x, y, y, need_weights=False)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="need_weights"):
        ours(x, x, x, need_weights=True)


def test_int8_of_a_convolutional_backbone_is_refused_with_the_reason(tiny_timm):
    name, weights = tiny_timm
    with pytest.raises(ValueError, match="Linear layers.*convolutional.*--precision fp32"):
        create_embedder(EmbedderConfig(model=name, pretrained=str(weights), device="cpu", precision="int8"))


def test_int8_on_a_gpu_or_without_int8_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="int8.*CPU only.*--device cpu.*fp16 / bf16"):
        check_device("cuda", "int8")
    assert check_device("auto", "int8").type == "cpu"  # auto means the CPU for int8
    monkeypatch.setattr("clipfuse.embed.int8.supported_engines", lambda: ["none"])
    with pytest.raises(ValueError, match="no int8 kernels.*--precision fp32"):
        check_device("cpu", "int8")


def test_quantize_keeps_a_model_usable_for_open_clip_text_dtype_checks(tiny_model):
    model = create_embedder(EmbedderConfig(model=tiny_model, device="cpu")).model
    q = quantize_int8(model, tiny_model)
    assert q.transformer.get_cast_dtype() == torch.float32  # open_clip reads it off a (now int8) Linear weight


# ---- the store: int8 versions -------------------------------------------------------------------------
@pytest.fixture
def shapes(tmp_path):
    write_shapes_folder(tmp_path / "labeled", n_per_class=4, seed=0)
    return tmp_path


def test_int8_index_is_a_version_of_its_own_and_is_queried_in_int8(shapes, tiny_model, int8, fp32):
    ws = clipfuse.open(shapes / "store.lance")
    ws.index(shapes / "labeled", model=tiny_model, batch_size=8)
    r = ws.index(shapes / "labeled", model=tiny_model, batch_size=8, precision="int8")
    assert r.summary.embedded == 12
    versions = ws.versions()
    assert [v.precision for v in versions] == ["fp32", "int8"]
    v32, v8 = versions
    assert (v32.fingerprint, v8.fingerprint) == (fp32.fingerprint, int8.fingerprint)
    assert ws.version().fingerprint == v8.fingerprint and "int8" in v8.describe()
    stored = Store(shapes / "store.lance")
    paths = sorted((shapes / "labeled").rglob("*.png"))
    vec8 = stored.vectors_for([read_image(paths[0])[0].id], v8.fingerprint)
    # activations are quantized per batch, so an image's int8 vector depends a little on its batch
    assert float(vec8[0] @ int8.encode_images([read_image(paths[0])[1]])[0]) > 0.999

    # a text query of the int8 version is embedded with the int8 text tower
    got = ws.neighbors(text="a red circle", version=v8.short, k=3)
    want = (stored.load_embeddings(v8.fingerprint).X @ int8.encode_texts(["a red circle"])[0])
    assert got.neighbors[0].similarity == pytest.approx(float(np.sort(want)[-1]), abs=1e-5)
    # an image file outside the store is embedded now, in int8
    outside = shapes / "outside.png"
    _noise(99).save(outside)
    got = ws.neighbors(str(outside), version=v8.short, k=1)
    q = int8.encode_images([read_image(outside)[1]])[0]
    assert got.neighbors[0].similarity == pytest.approx(float(np.max(stored.load_embeddings(v8.fingerprint).X @ q)),
                                                        abs=1e-5)

    # re-indexing without --precision adds to the int8 version (no third version)
    write_shapes_folder(shapes / "more", n_per_class=1, seed=5)
    again = ws.index(shapes / "labeled", unlabeled=shapes / "more", batch_size=8)
    assert again.summary.embedded == 3 and again.summary.fingerprint == v8.fingerprint
    assert len(ws.versions()) == 2 and ws.version().precision == "int8"


def test_int8_index_refused_on_a_gpu_device_before_anything_is_written(shapes, tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ws = clipfuse.open(shapes / "store.lance")
    with pytest.raises(OptionError, match="CPU only") as e:
        ws.index(shapes / "labeled", model=tiny_model, precision="int8", device="cuda")
    assert e.value.option == "--device" and not (shapes / "store.lance").exists()


def test_a_store_made_before_precision_was_recorded_reads_as_fp32_and_takes_new_versions(tmp_path):
    import lancedb

    from clipfuse.store.store import VERSIONS_SCHEMA

    old_schema = pa.schema([f for f in VERSIONS_SCHEMA if f.name not in ("precision", "decode")])
    db = lancedb.connect(tmp_path / "old.lance")
    db.create_table("embedding_versions", pa.Table.from_pylist([{
        "fingerprint": "a" * 16, "table": "embeddings_" + "a" * 16, "model": "m", "pretrained": None,
        "weights_hash": "h", "preprocess": "p", "dim": 4, "random_weights": False, "source": "index",
        "created_at": 1.0, "activated_at": 2.0}], schema=old_schema))
    store = Store(tmp_path / "old.lance")
    (old,) = store.versions()
    assert (old.precision, old.decode) == ("fp32", "full")
    store.register_version({"fingerprint": "b" * 16, "model": "m", "dim": 4, "precision": "int8", "decode": "draft"})
    got = {v.fingerprint[0]: (v.precision, v.decode) for v in Store(tmp_path / "old.lance").versions()}
    assert got == {"a": ("fp32", "full"), "b": ("int8", "draft")}


# ---- reduced-size JPEG decoding ----------------------------------------------------------------------
def _jpeg(w: int, h: int, orientation: int | None = None) -> bytes:
    img = _noise(3, size=64).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    if orientation is None:
        img.save(buf, "JPEG", quality=92)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


def test_draft_decodes_large_jpegs_smaller_but_never_below_the_size_asked():
    full = decode_image(_jpeg(1600, 1000))
    small = decode_image(_jpeg(1600, 1000), draft_size=224)
    assert full.size == (1600, 1000) and small.size == (400, 250)  # 1/4: the largest scale keeping >= 224
    assert small.mode == "RGB"
    assert decode_image(_jpeg(400, 300), draft_size=224).size == (400, 300)  # not twice as large: full
    png = io.BytesIO()
    _noise(1, 64).resize((1600, 1000)).save(png, "PNG")
    assert decode_image(png.getvalue(), draft_size=224).size == (1600, 1000)  # only JPEG has a draft mode


def test_draft_records_keep_the_full_upright_size(tmp_path):
    path = tmp_path / "turned.jpg"
    path.write_bytes(_jpeg(1600, 1000, orientation=6))  # 90 degrees: upright it is 1000 x 1600
    record, img = read_image(path, draft_size=224)
    assert (record.width, record.height) == (1000, 1600)
    assert img.size == (250, 400)
    full_record, _ = read_image(path)
    assert (full_record.width, full_record.height) == (1000, 1600) and full_record.id == record.id


def test_draft_vectors_are_close_to_full_decoding(tiny_model, tmp_path):
    draft = create_embedder(EmbedderConfig(model=tiny_model, device="cpu", decode="draft"))
    assert draft.draft_size >= 32  # never below what the preprocessing resizes to
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(1024, 768))
    full_vec = draft.encode_images([read_image(path)[1]])
    draft_vec = draft.encode_images([draft.read_image(str(path))[1]])
    assert draft.read_image(str(path))[1].size[1] < 768
    assert float((full_vec * draft_vec).sum()) > 0.99


def test_unknown_decode_is_refused(tiny_model, shapes):
    with pytest.raises(ValueError, match="decode must be full or draft"):
        create_embedder(EmbedderConfig(model=tiny_model, device="cpu", decode="fast"))
    with pytest.raises(OptionError, match="full or draft"):
        clipfuse.open(shapes / "s.lance").index(shapes / "labeled", model=tiny_model, decode="fast")


def test_cli_index_int8_then_info_and_a_text_query(shapes, tiny_model):
    from typer.testing import CliRunner

    from clipfuse.cli import app

    runner = CliRunner()
    db = str(shapes / "cli.lance")
    r = runner.invoke(app, ["index", str(shapes / "labeled"), "--db", db, "--model", tiny_model, "--precision", "int8",
                            "--decode", "draft"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", "--db", db], catch_exceptions=False)
    assert r.exit_code == 0 and "int8" in r.output and "draft" in r.output
    (v,) = Store(db).versions()
    assert (v.precision, v.decode) == ("int8", "draft")
    r = runner.invoke(app, ["neighbors", "--text", "a red circle", "--db", db, "--k", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["neighbors", "--text", "a red circle", "--db", db, "--device", "cuda"],
                      catch_exceptions=False)
    assert r.exit_code == 2  # no GPU here; with one, int8's own "runs on the CPU only" (tested above)
    r = runner.invoke(app, ["index", str(shapes / "labeled"), "--db", db, "--precision", "fp8"])
    assert r.exit_code == 2 and "fp8" in r.output


def test_attention_that_self_attention_cannot_mirror_is_left_to_torch():
    from clipfuse.embed.int8 import _replace_attention

    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 2, add_bias_kv=True),
                                torch.nn.MultiheadAttention(16, 2, add_zero_attn=True),
                                torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=8),
                                torch.nn.MultiheadAttention(16, 2))
    _replace_attention(model)
    assert [type(m).__name__ for m in model] == ["MultiheadAttention"] * 3 + ["SelfAttention"]
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(5, 16)  # unbatched, as torch takes it
    torch.testing.assert_close(SelfAttention(mha)(x, x, x)[0], mha(x, x, x, need_weights=False)[0],
                               atol=1e-5, rtol=1e-4)


def test_resnet_clip_int8_is_refused_not_crashed():
    # its attention pool reads its projections' weights itself, so it stays fp32, and the rest is convolutions
    with pytest.raises(ValueError, match="convolutional"):
        create_embedder(EmbedderConfig(model="RN50", random_weights=True, device="cpu", precision="int8"))


def test_a_query_of_an_int8_version_on_a_gpu_device_names_the_version(shapes, tiny_model, monkeypatch):
    ws = clipfuse.open(shapes / "store.lance")
    ws.index(shapes / "labeled", model=tiny_model, precision="int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(OptionError, match="is int8, which runs on the CPU only") as e:
        ws.neighbors(text="a red circle", device="cuda")
    assert e.value.option == "--device"
    with pytest.raises(OptionError, match="int8, which runs on the CPU only"):
        ws.index(shapes / "labeled", device="cuda")  # the store's int8 version, inherited
