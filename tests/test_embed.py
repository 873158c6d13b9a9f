"""Tests of clipfuse.embed: robust image reading, the open_clip embedder, the batch pipeline."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfuse.data import hash_bytes
from clipfuse.embed import (
    EmbedderConfig,
    PretrainedWeightsError,
    create_embedder,
    decode_image,
    hash_state_dict,
    iter_image_batches,
    read_image,
    to_rgb,
)

from conftest import TINY_MODEL_CFG

RED, BLUE = (220, 20, 20), (20, 20, 220)


# --------------------------------------------------------------------------- helpers


def _noise(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _two_halves(w: int = 40, h: int = 20) -> Image.Image:
    """Left half red, right half blue: shows which way a rotation went."""
    img = Image.new("RGB", (w, h), RED)
    img.paste(BLUE, (w // 2, 0, w, h))
    return img


def _close(pixel, expected, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """A small picklable preprocess for pipeline tests: 8x8 float tensor (3, 8, 8)."""
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- unusable files


def test_truncated_jpeg_gives_error_record(tmp_path):
    data = _encode(_noise(), "JPEG", quality=90)
    path = _write(tmp_path / "cut.jpg", data[: len(data) // 2])
    record, img = read_image(path)
    assert img is None
    assert record.error is not None and "truncated" in record.error
    assert record.bytes == len(data) // 2


def test_truncated_png_gives_error_record(tmp_path):
    data = _encode(_noise(), "PNG")
    record, img = read_image(_write(tmp_path / "cut.png", data[: len(data) // 2]))
    assert img is None
    assert "truncated" in record.error


def test_zero_byte_file_gives_empty_error(tmp_path):
    record, img = read_image(_write(tmp_path / "empty.png", b""))
    assert img is None
    assert "empty" in record.error


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    record, img = read_image(_write(tmp_path / "notes.jpg", b"this is a shopping list, not a photo\n" * 20))
    assert img is None
    assert "not an image" in record.error


def test_missing_file_gives_error_record(tmp_path):
    record, img = read_image(str(tmp_path / "gone.png"))
    assert img is None
    assert "cannot read" in record.error


def test_decode_image_raises_value_error_with_reason():
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    with pytest.raises(ValueError, match="not an image"):
        decode_image(b"GIF? no, plain text")


@pytest.mark.parametrize("side", [20, 12])  # 400 px: DecompressionBombError; 144 px: the warning, made an error
def test_decompression_bomb_is_refused_and_limit_restored(tmp_path, side):
    before = Image.MAX_IMAGE_PIXELS
    path = _write(tmp_path / "bomb.png", _encode(Image.new("RGB", (side, side), RED), "PNG"))
    record, img = read_image(path, max_pixels=100)
    assert img is None
    assert "100" in record.error and "limit" in record.error
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is put back
    ok, img = read_image(path, max_pixels=side * side)
    assert ok.error is None and img.size == (side, side)


def test_non_utf8_file_name_gives_error_record(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/bad\xff.png"
    try:
        with open(raw, "wb") as f:
            f.write(_encode(_two_halves(), "PNG"))
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    record, img = read_image(os.fsdecode(raw))
    assert img is None
    assert "UTF-8" in record.error


# --------------------------------------------------------------------------- good files, odd modes


def test_cmyk_jpeg_becomes_rgb_with_right_colour(tmp_path):
    src = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(src, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    record, img = read_image(_write(tmp_path / "cmyk.jpg", data))
    assert record.error is None
    assert img.mode == "RGB"
    assert _close(img.getpixel((8, 8)), (255, 0, 0), tol=20)


def test_16bit_grayscale_png_is_rescaled_not_clipped(tmp_path):
    data = _encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    record, img = read_image(_write(tmp_path / "deep.png", data))
    assert record.error is None and img.mode == "RGB"
    r, g, b = img.getpixel((3, 3))
    assert r == g == b
    assert abs(r - 40000 / 257) <= 1  # ~156, not 255


def test_16bit_gradient_keeps_order_and_range():
    a = np.linspace(0, 65535, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    img = decode_image(_encode(Image.fromarray(a), "PNG"))
    grey = np.asarray(img)[..., 0].reshape(-1).astype(int)
    assert grey[0] == 0 and grey[-1] == 255
    assert np.all(np.diff(grey) >= 0)


def test_dark_16bit_png_is_scaled_like_any_16bit_png():
    data = _encode(Image.fromarray(np.full((4, 4), 200, dtype=np.uint16)), "PNG")
    assert decode_image(data).getpixel((0, 0))[0] <= 1  # 200/65535 of full scale


def test_rgba_png_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (0, 0, 0, 0)  # fully transparent black
    a[0, 2] = (0, 0, 255, 128)  # half-transparent blue
    record, img = read_image(_write(tmp_path / "alpha.png", _encode(Image.fromarray(a, "RGBA"), "PNG")))
    assert record.error is None and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((1, 0)) == (255, 255, 255)  # white, not the black underneath
    assert _close(img.getpixel((2, 0)), (127, 127, 255), tol=3)


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))  # index 0 black, index 1 green
    img.putpixel((2, 2), 1)
    data = _encode(img, "PNG", transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and "transparency" in opened.info
    record, out = read_image(_write(tmp_path / "palette.png", data))
    assert record.error is None and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (0, 200, 0)


@pytest.mark.parametrize("mode, colour", [("L", 0), ("RGB", (0, 0, 0))])
def test_single_transparent_colour_composited_on_white(mode, colour):
    img = Image.new(mode, (4, 4), colour)
    img.putpixel((1, 1), 255 if mode == "L" else (0, 200, 0))
    data = _encode(img, "PNG", transparency=colour)  # a tRNS chunk: one colour means "transparent"
    out = decode_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == ((255, 255, 255) if mode == "L" else (0, 200, 0))


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotated_jpeg_is_upright(tmp_path, orientation, top, bottom):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_two_halves(40, 20), "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    record, img = read_image(_write(tmp_path / f"rot{orientation}.jpg", data))
    assert record.error is None
    assert img.size == (20, 40)
    assert (record.width, record.height) == (20, 40)
    assert _close(img.getpixel((10, 5)), top, tol=30)
    assert _close(img.getpixel((10, 34)), bottom, tol=30)


def test_non_ascii_file_name_reads_fine(tmp_path):
    path = tmp_path / "café_日本.png"
    path.write_bytes(_encode(_two_halves(), "PNG"))
    record, img = read_image(str(path))
    assert record.error is None
    assert record.path == str(path)
    assert img.size == (40, 20) and img.getpixel((0, 0)) == RED


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),  # transparent black -> white
        (Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), (0, 0, 0)),  # flat float image
        (Image.fromarray(np.full((2, 2), 40000, dtype=np.int32)), (156, 156, 156)),
    ],
    ids=["L", "1", "LA", "F-flat", "I-32bit"],
)
def test_to_rgb_modes(img, expected):
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == expected


def test_to_rgb_returns_rgb_unchanged():
    img = _two_halves()
    assert to_rgb(img) is img


# --------------------------------------------------------------------------- content ids


def test_ids_follow_content_not_name(tmp_path):
    a = _encode(_two_halves(), "PNG")
    b = _encode(_noise(20, 40), "PNG")
    rec_a1, _ = read_image(_write(tmp_path / "a.png", a))
    rec_a2, _ = read_image(_write(tmp_path / "copy of a.png", a))
    rec_b, _ = read_image(_write(tmp_path / "b.png", b))
    assert rec_a1.error is None and rec_b.error is None
    assert rec_a1.id == rec_a2.id == hash_bytes(a)
    assert rec_a1.id != rec_b.id
    assert rec_a1.bytes == len(a)
    assert (rec_a1.width, rec_a1.height) == (40, 20)


# --------------------------------------------------------------------------- embedder


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return create_embedder(EmbedderConfig(model=tiny_model))


def test_embedder_images_are_unit_float32(embedder):
    X = embedder.encode_images([_noise(seed=i) for i in range(3)] + [_two_halves()])
    assert X.dtype == np.float32
    assert X.shape == (4, 16) and embedder.dim == 16
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(X[0], X[3], atol=1e-3)  # different images, different vectors
    assert embedder.encode_images([]).shape == (0, 16)


def test_embedder_texts_are_unit_float32(embedder):
    T = embedder.encode_texts(["a red circle", "a blue square"])
    assert T.dtype == np.float32
    assert T.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(T[0], T[1], atol=1e-3)
    assert embedder.encode_texts([]).shape == (0, 16)


def test_embedder_info_for_local_dir(embedder, tiny_model):
    info = embedder.info
    assert info.model == tiny_model
    assert info.random_weights is False
    assert info.pretrained is None  # the folder's own weights, not a tag
    assert info.dim == 16
    assert info.weights_hash == hash_state_dict(embedder.model.state_dict())


def test_fingerprint_same_model_same_other_model_different(embedder, tiny_model, other_tiny_model):
    again = create_embedder(EmbedderConfig(model=tiny_model))
    other = create_embedder(EmbedderConfig(model=other_tiny_model))
    assert again.fingerprint == embedder.fingerprint
    assert other.fingerprint != embedder.fingerprint
    assert other.info.weights_hash != embedder.info.weights_hash


def test_fingerprint_follows_weights_under_same_name(embedder, tiny_model, other_tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model.removeprefix("local-dir:"), folder)
    name = f"local-dir:{folder}"
    first = create_embedder(EmbedderConfig(model=name))
    assert first.info.weights_hash == embedder.info.weights_hash
    # retrained weights dropped into the same folder: same name, new fingerprint
    shutil.copy(Path(other_tiny_model.removeprefix("local-dir:")) / "open_clip_model.safetensors", folder)
    second = create_embedder(EmbedderConfig(model=name))
    assert second.fingerprint != first.fingerprint


def test_hash_state_dict_sees_one_changed_value():
    state = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    changed = {"a": torch.zeros(3), "b": torch.ones(2, 2)}
    changed["b"][1, 1] = 2.0
    assert hash_state_dict(state) == hash_state_dict({k: v.clone() for k, v in state.items()})
    assert hash_state_dict(state) != hash_state_dict(changed)


def test_encode_images_equals_encode_pixels(tiny_model):
    emb = create_embedder(EmbedderConfig(model=tiny_model, batch_size=2))  # 5 images: 3 chunks
    images = [_noise(seed=i) for i in range(5)]
    via_images = emb.encode_images(images)
    via_pixels = emb.encode_pixels(torch.stack([emb.preprocess(im) for im in images]))
    assert via_images.shape == via_pixels.shape == (5, 16)
    np.testing.assert_allclose(via_images, via_pixels, atol=1e-5)


# --------------------------------------------------------------------------- pretrained failures


def test_unknown_pretrained_for_builtin_model_raises():
    cfg = EmbedderConfig(model="RN50", pretrained="/nonexistent/weights.safetensors", device="cpu")
    with pytest.raises(PretrainedWeightsError) as info:
        create_embedder(cfg)
    msg = str(info.value)
    assert "RN50" in msg and "/nonexistent/weights.safetensors" in msg
    assert "--pretrained" in msg and "local-dir:" in msg


def test_no_pretrained_for_builtin_model_raises():
    with pytest.raises(PretrainedWeightsError, match="--allow-random-weights"):
        create_embedder(EmbedderConfig(model="RN50", pretrained=None, device="cpu"))


@pytest.fixture
def weightless_model(tmp_path) -> str:
    """A ``local-dir:`` folder with the tiny config but no weights file."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def test_local_dir_without_weights_raises_by_default(weightless_model):
    with pytest.raises(PretrainedWeightsError) as info:
        create_embedder(EmbedderConfig(model=weightless_model, device="cpu"))
    assert weightless_model in str(info.value)
    assert "--allow-random-weights" in str(info.value)


def test_local_dir_without_weights_allowed_random(weightless_model):
    cfg = EmbedderConfig(model=weightless_model, device="cpu", allow_random_weights=True)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        emb = create_embedder(cfg)
    assert emb.info.random_weights is True
    assert emb.info.pretrained is None
    X = emb.encode_images([_two_halves()])
    assert X.shape == (1, 16)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        again = create_embedder(cfg)
    assert again.fingerprint == emb.fingerprint  # random weights are seeded


def test_missing_local_dir_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_embedder(EmbedderConfig(model=f"local-dir:{tmp_path / 'nope'}", device="cpu"))


def test_bad_precision_raises(tiny_model):
    with pytest.raises(ValueError, match="fp8"):
        create_embedder(EmbedderConfig(model=tiny_model, precision="fp8", device="cpu"))


def test_fp16_on_cpu_raises(tiny_model):
    with pytest.raises(ValueError, match="GPU"):
        create_embedder(EmbedderConfig(model=tiny_model, precision="fp16", device="cpu"))


def test_bad_batch_size_raises(tiny_model):
    with pytest.raises(ValueError, match="batch_size"):
        create_embedder(EmbedderConfig(model=tiny_model, batch_size=0, device="cpu"))


# --------------------------------------------------------------------------- pipeline


@pytest.fixture
def mixed_files(tmp_path) -> tuple[list[str], list[bool]]:
    """Sorted paths of good and bad files; the first three are all bad."""
    specs = [
        ("00_empty.png", b""),
        ("01_text.jpg", b"not an image at all"),
        ("02_cut.jpg", _encode(_noise(seed=9), "JPEG")[:300]),
        ("03_good.png", _encode(_noise(seed=1), "PNG")),
        ("04_bomb.png", _encode(_noise(100, 100, seed=2), "PNG")),  # over the max_pixels used below
        ("05_good.jpg", _encode(_noise(seed=3), "JPEG")),
        ("06_good.png", _encode(_two_halves(), "PNG")),
        ("07_text.png", b"\x89PNG but not really"),
    ]
    paths = [_write(tmp_path / name, data) for name, data in specs]
    good = ["good" in name for name, _ in specs]
    return paths, good


@pytest.mark.parametrize("workers,threads", [(0, 1), (0, 3), (1, 1)])
def test_iter_image_batches_keeps_order_and_skips_bad(mixed_files, workers, threads):
    paths, good = mixed_files
    batches = list(iter_image_batches(paths, _to_tensor, batch_size=3, workers=workers, max_pixels=64 * 48,
                                      threads=threads))
    assert [len(b.records) for b in batches] == [3, 3, 2]
    records = [r for b in batches for r in b.records]
    assert [r.path for r in records] == paths
    assert [r.error is None for r in records] == good
    # first batch is all bad: no pixels, no crash
    assert batches[0].ok == [] and batches[0].pixels.shape[0] == 0
    for start, batch in zip((0, 3, 6), batches):
        assert batch.ok == [i for i in range(len(batch.records)) if good[start + i]]
        assert batch.pixels.shape[0] == len(batch.ok)
        for row, i in enumerate(batch.ok):
            _, img = read_image(paths[start + i])
            assert torch.equal(batch.pixels[row], _to_tensor(img))  # rows belong to their records


def test_iter_image_batches_empty_list():
    assert list(iter_image_batches([], _to_tensor, workers=0)) == []
    assert list(iter_image_batches([], _to_tensor, workers=0, threads=2)) == []


def test_cpu_embedder_reads_batches_in_threads_between_forward_passes(tiny_model):
    e = create_embedder(EmbedderConfig(model=tiny_model, device="cpu"))
    assert e.workers == 0 and e.decode_threads == max(1, torch.get_num_threads())
    assert create_embedder(EmbedderConfig(model=tiny_model, device="cpu", workers=2)).decode_threads == 1


def test_preprocess_failure_becomes_record_error(tmp_path):
    paths = [_write(tmp_path / f"{i}.png", _encode(_noise(8 + i, 8, seed=i), "PNG")) for i in range(2)]

    def picky(img):
        if img.height == 9:
            raise RuntimeError("cannot handle 9 rows")
        return _to_tensor(img)

    (batch,) = iter_image_batches(paths, picky, batch_size=4, workers=0)
    assert batch.ok == [0]
    assert "preprocessing failed" in batch.records[1].error and "9 rows" in batch.records[1].error


def test_embedder_batches_match_encode_images(tiny_model, mixed_files):
    paths, good = mixed_files
    emb = create_embedder(EmbedderConfig(model=tiny_model, batch_size=3, workers=0, max_image_pixels=64 * 48))
    rows, ids = [], []
    for batch in emb.iter_batches(paths):
        rows.append(emb.encode_pixels(batch.pixels))
        ids += [batch.records[i].id for i in batch.ok]
    X = np.concatenate(rows)
    good_paths = [p for p, g in zip(paths, good) if g]
    assert X.shape == (len(good_paths), 16)
    assert ids == [read_image(p)[0].id for p in good_paths]
    expected = emb.encode_images([read_image(p)[1] for p in good_paths])
    np.testing.assert_allclose(X, expected, atol=1e-5)


def test_class_text_embeddings_average_the_prompts(embedder):
    from clipfuse.embed import DEFAULT_TEMPLATES, build_prompts, class_text_embeddings

    prompts = build_prompts(["cat", "kitten"], DEFAULT_TEMPLATES)
    assert len(prompts) == 2 * len(DEFAULT_TEMPLATES) and prompts[0] == "a photo of a cat."
    T = class_text_embeddings(embedder, ["cat", "dog"], {"cat": ["cat", "kitten"], "dog": ["dog"]})
    assert T.shape == (2, 16) and T.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1.0, atol=1e-5)
    mean = embedder.encode_texts(prompts).mean(axis=0)
    np.testing.assert_allclose(T[0], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        build_prompts(["cat"], ("a photo of {} and {}.",))
