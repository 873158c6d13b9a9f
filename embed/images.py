"""Read image files robustly: hash, decode, orient and convert to RGB, or say why not."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfuse.data import DEFAULT_MAX_FILE_BYTES, UNSUPPORTED_EXTENSIONS, FileTooLargeError, hash_bytes, read_regular_file
from clipfuse.data.remote import is_uri, read_object

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # HEIC files then fail to decode with Pillow's own "not an image" reason
        return
    register_heif_opener()


_register_heif()


@dataclass
class ImageRecord:
    """What reading one file found out; ``error`` is set when it is not usable."""

    path: str
    id: str | None = None  # content hash of the file's bytes
    bytes: int = 0
    mtime: float = 0.0
    width: int = 0
    height: int = 0
    error: str | None = None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white; 16-bit and 32-bit integer or float
    images are rescaled to 0..255 rather than clipped (which would turn them white).
    """
    if "transparency" in img.info and img.mode in ("L", "RGB", "P"):
        img = img.convert("RGBA")  # a single transparent colour (PNG tRNS) counts as transparency too
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        elif img.mode.startswith("I;16"):
            a = a / 257.0  # always: a dark 16-bit frame must not come out brighter than a bright one
        else:
            a = a / 257.0 if a.max(initial=0) > 255 else a  # 32-bit ints: 16-bit data when above 255
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image.

    With ``draft_size``, a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or
    1/8 scale by the JPEG decoder itself (Pillow's ``draft``), never below ``draft_size`` on either
    side: several times faster for photos much larger than the model's input, with slightly
    different pixels (so it is part of a version's fingerprint). Other formats decode in full.

    Raises
    ------
    ValueError
        With a short human reason (empty file, not an image, truncated, too large...).
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        img = _open(data, max_pixels)
        full = None
        if draft_size and img.format in ("JPEG", "MPO") and min(img.size) >= 2 * draft_size:
            full = img.size
            img.draft(img.mode if img.mode in ("L", "CMYK") else "RGB", (draft_size, draft_size))
        img.load()
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if full is not None and img.getexif().get(0x0112) in (5, 6, 7, 8):  # exif_transpose turns it
            full = full[::-1]
        img = to_rgb(ImageOps.exif_transpose(img))
        if full is not None:
            img.info["clipfuse_full_size"] = full
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large (decompression-bomb limit of {max_pixels} pixels): {e}") from e
    except UnidentifiedImageError as e:
        raise ValueError("not an image Pillow can read (unknown or unsupported format)") from e
    except OSError as e:
        msg = str(e)
        reason = "truncated or corrupt image" if "truncat" in msg.lower() else "corrupt image"
        raise ValueError(f"{reason}: {msg}") from e
    except (SyntaxError, ValueError, TypeError, IndexError, struct.error) as e:
        raise ValueError(f"corrupt image: {type(e).__name__}: {e}") from e


_OPEN_LOCK = threading.Lock()


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (the header only) with ``max_pixels`` as the decompression-bomb limit.

    Pillow reads its limit from a module global and reports it as a warning, so the swap of both is
    done under a lock: batches are decoded by several threads at once. The pixels are decoded
    after, outside the lock.
    """
    with _OPEN_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:  # whatever the global says meanwhile
        raise Image.DecompressionBombError(f"{img.size[0]} x {img.size[1]} = {img.size[0] * img.size[1]} pixels")
    return img


def read_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = DEFAULT_MAX_FILE_BYTES, storage_options: dict | None = None,
               draft_size: int | None = None) -> tuple[ImageRecord, Image.Image | None]:
    """Read, hash and decode one file (or object: ``s3://...``, read with ``storage_options``).

    Never raises for a bad file: the returned record carries the reason in ``error``
    and the image is ``None``. Only regular files (or symlinks to them) of at most
    ``max_bytes`` are read: a FIFO, a device or a runaway file is an error, never a hang.
    ``draft_size``: see :func:`decode_image`; the record keeps the file's full width and height.

    Returns
    -------
    record : ImageRecord
    image : PIL.Image.Image or None
        Upright RGB image, or None when the file is not usable.
    """
    path = os.fspath(path)
    record, data = read_image_bytes(path, max_bytes=max_bytes, storage_options=storage_options)
    if data is None:
        return record, None
    return record, decode_record(record, data, max_pixels=max_pixels, draft_size=draft_size)


def read_image_bytes(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
                     storage_options: dict | None = None) -> tuple[ImageRecord, bytes | None]:
    """The first half of :func:`read_image`: read and hash the bytes, or say why not (``data`` None)."""
    path = os.fspath(path)
    record = ImageRecord(path=path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        record.error = "file name is not valid UTF-8; rename the file"
        return record, None
    unsupported = UNSUPPORTED_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if unsupported:
        record.error = f"unsupported image type: {unsupported}"
        return record, None
    try:
        if is_uri(path):
            data, record.bytes, record.mtime = read_object(path, max_bytes=max_bytes, storage_options=storage_options)
        else:
            data, st = read_regular_file(path, max_bytes=max_bytes)
            record.bytes, record.mtime = st.st_size, st.st_mtime
    except FileTooLargeError as e:
        record.error = str(e)
        return record, None
    except OSError as e:
        record.error = f"cannot read file: {e.strerror or e}"
        return record, None
    record.id = hash_bytes(data)
    return record, data


def decode_record(record: ImageRecord, data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  draft_size: int | None = None) -> Image.Image | None:
    """The second half of :func:`read_image`: decode, setting ``record.error`` (and returning None) on failure.

    The record gets the image's full (upright) size, also when ``draft_size`` decoded it smaller."""
    try:
        img = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    except ValueError as e:
        record.error = str(e)
        return None
    record.width, record.height = img.size
    full = img.info.get("clipfuse_full_size")
    if full is not None:
        record.width, record.height = full
    return img
